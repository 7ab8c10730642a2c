"""Reports rendered from packaged Jinja2 templates, and ``elmreg report``'s page with its matplotlib figures."""
