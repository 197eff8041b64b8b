"""Methods: one strategy per resizing method (which statistics it needs, how it solves, which
rewrite passes it returns) and the registry that lists them."""
