"""The composition root and the operator's commands: the only place that builds real clients."""
