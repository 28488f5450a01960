"""The GRADIENTS tab for TensorBoard (plugin.py), reading gradlab runs through gradlab.observe.events (data.py)."""
