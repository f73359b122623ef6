"""The offline teacher cache: its format and reader (`store`), its building (`build`) and the `build_teacher_cache`
job (`job`)."""
