"""What observes a run: the gradient instruments (one Lightning callback each), the health report and its rules,
the gradient-flow picture, the event-file reader and the one writer to TensorBoard."""
