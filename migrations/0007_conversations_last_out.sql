-- conversations.last_msg_id is now the owner's last message *out* to the peer: a save writes only
-- the sender's row (the recipient's is created if missing, never rewritten), and reads take the last
-- message either way as the greater of the two rows' ids. That is one row write and two index
-- changes less per message. The conversation list scans the owner's rows by primary key and
-- sorts them (a user's conversations, not the table), so idx_recent served nothing any more; and
-- updated_at was never read.
ALTER TABLE conversations DROP KEY idx_recent, DROP COLUMN updated_at;
