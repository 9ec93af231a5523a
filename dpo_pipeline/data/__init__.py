"""Raw preference rows -> prepared, tokenized rows: readers, filters, templating, split, contamination."""
