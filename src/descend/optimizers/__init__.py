"""The update rules: one module per rule family, each a per-tensor reference, its faster
forms where they pay, a declaration of its state and a thin class over the common pipeline
of :mod:`descend.optimizer`."""
