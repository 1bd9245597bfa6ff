"""The nbdkit Python plugin that serves a rampool volume.

nbdkit loads this package's plugin module; for every request it maps the byte
range onto the volume's stripes and sends it, through libnbd, to the replicas
held by memservers: reads to one healthy replica, writes to all of them.
"""
