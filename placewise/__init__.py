"""placewise: device placement, pipelines, async SGD and optimizer fusion."""
