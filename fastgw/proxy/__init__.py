"""The proxy itself: the client connection, the relay of one exchange, upstream connections and pools."""
