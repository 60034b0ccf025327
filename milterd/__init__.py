"""milterd: a plugin-based milter and policy daemon bringing Domain Security to Postfix and Sendmail."""

__version__ = "0.1.0"
