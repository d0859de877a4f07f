"""
Phone apps on a map: devices and their tokens, the apps' own formats, their
endpoints, and what unknown tokens cost the address that sends them.
"""
