"""The Textual dashboard and the ``persona`` command line. Textual is imported only by the
dashboard modules, so headless commands and workers start without it."""
