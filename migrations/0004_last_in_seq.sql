-- conversations.last_in_seq repeated the peer's row: the owner's last seq in is the peer's
-- last_out_seq (both rows of a conversation are written in the same transaction). Reads join the
-- peer's row instead, and a save writes one column less.
ALTER TABLE conversations DROP COLUMN last_in_seq;
