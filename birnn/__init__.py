"""Uni- vs bidirectional vanilla RNN on sequential MNIST, numpy from scratch."""
