"""The virtual lab: QEMU machines (TCG only) and virtual cables in network namespaces.

Used by the integration tests, the end-to-end molecule scenario, the demo and
``stiefelctl test-qemu``. Never part of what runs on a laptop or a stick.
"""
