"""From files to token ids: read + validate (`read`), the served format (`chat_format`), SFT samples
(`dataset`), preference pairs (`pairs`) and batches (`collate`)."""
