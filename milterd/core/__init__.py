"""The daemon's core: typed config, the app and hook dispatch, the plugin manager, metrics, process control."""
