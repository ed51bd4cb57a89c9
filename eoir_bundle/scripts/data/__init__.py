"""Data lists (LUMIR dataset JSONs, folders, pairs) and the random-pair training dataset."""
