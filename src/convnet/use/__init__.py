"""Using a trained model: a run folder or an ``.onnx`` file opened, predictions for files and arrays,
heat maps, the ONNX export, and the HTTP service.
"""
