"""The runtime every job shares: config parsing (`config`, `errors`, `registry`), where models and data come from
(`models`, `data`, `offline`, `conversion_cache`), architecture adapters (`arch`), students and layer maps (`student`,
`mapping`), the loss interface (`loss_interface`, `schedule`), run start and finish (`run`, `io`, `tracking`), the
training loop (`trainer`, `collate`), evaluation (`evaluate`), measurements in a process of their own (`probe`), jobs
and their command line (`jobs`, `cli`). It imports nothing above it."""
