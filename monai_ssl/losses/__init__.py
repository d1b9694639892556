"""Pluggable loss terms for the semi-supervised trainer."""
