"""Knowing when to trust a model: scores, the classification report, likely label errors,
calibration, the pictures and the HTML report.
"""
