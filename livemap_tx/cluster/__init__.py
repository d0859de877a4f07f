"""
The nodes of a cluster: the backplane (what nodes tell each other), the bus
it runs on (in memory, or on one or several Redis servers), the other nodes,
and the cluster as the store of private maps and devices.
"""
