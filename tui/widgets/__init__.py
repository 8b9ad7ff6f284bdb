"""Reusable widgets and renderables for the dashboard's screens."""
