"""From bytes to a data set: named data sets (catalog, download, reading), folders of images (scan,
decode cache, split), arrays and image files in a model's input spec, and the files given for prediction.
"""
