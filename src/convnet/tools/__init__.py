"""What is built from the stages below: ``convnet train``'s whole job (train, score, track), the
search (``convnet tune``), the benchmark and the tutorial.
"""
