"""How messages arrive and answers leave: an inbound adapter and an outbound per channel."""
