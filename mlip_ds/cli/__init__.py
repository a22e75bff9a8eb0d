"""Console commands (setup.py's console_scripts) whose code is not an evaluation module's own ``main``."""
