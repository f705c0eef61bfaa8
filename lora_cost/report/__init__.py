"""Renderers: JSON documents, rich terminal tables and the plotly HTML report. They only read results."""
