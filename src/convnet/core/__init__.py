"""The foundations every stage stands on: user errors, options declared once, files written whole,
progress bars, HTML parts, the input spec, and the run folder (its files' names and writers). No module
here imports another stage.
"""
