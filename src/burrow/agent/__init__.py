"""The agent: the code behind ``burrow.forward()``."""
