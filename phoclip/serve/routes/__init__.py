"""One router per resource: health, search, tags, pictures (thumbnails, photos, items)
and the page."""
