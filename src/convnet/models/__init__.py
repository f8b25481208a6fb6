"""The networks and how they run: names and sizes (no torch), the networks and their registry, starting
weights from a run or the hub, the engine (device, precision, memory format), and the one forward pass.
"""
