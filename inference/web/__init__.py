"""The radiologists' web page (design.md §6): Flask app factory, served by waitress from `fedlesion node`."""

from inference.web.app import create_app

__all__ = ["create_app"]
