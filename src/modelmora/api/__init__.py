"""Thin routers over the service layer."""
