"""The method's steps, headless: they never import Textual."""
