"""
Live connections: one connection's protocol state (`client`), whatever
carries it: a WebSocket (`ws`) or a SockJS session (`sockjs_endpoint`).
"""
