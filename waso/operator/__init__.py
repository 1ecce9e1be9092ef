"""The waso operator: kopf handlers (thin) over pure decision modules.

Decisions (admission, placement, health, status) are pure functions in this package
that tests call without a cluster; ``controller`` and ``handlers`` do the I/O.
"""
