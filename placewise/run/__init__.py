"""Running plans: pipelines of stages (workload, cut, job, stage, pipeline), data parallelism
(`dataparallel/`), and the local launcher. Every module but `choices` imports torch."""
