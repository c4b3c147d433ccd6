"""Running plans: pipelines of stages, the parameter server, and the local launcher. Imports torch."""
