"""The `rampool` command line and the control plane it drives.

Registry, placement, the volume lifecycle, attach and detach on both the kernel
and the plugin path, and the agent that heals degraded volumes.
"""
