"""Reports people look at: self-contained HTML pages with inline figures (see `html.Report`)."""
