//! Shared checks of the metadata power-loss tests (meta_power_loss,
//! meta_grow_power_loss).

use tandem::bitmap::{BitmapPage, DirtyBitmap};

/// Words per 512-byte bitmap sector on disk (4032 blocks).
pub const SECTOR_WORDS: usize = 63;

/// Every sector of `found` equals that sector of `before` or of `after`.
pub fn sectors_old_or_new(found: &DirtyBitmap, before: &DirtyBitmap, after: &DirtyBitmap) -> bool {
    (0..found.page_count()).all(|p| {
        let page = BitmapPage(p);
        let (f, b, a) = (
            found.page_words(page),
            before.page_words(page),
            after.page_words(page),
        );
        f.chunks(SECTOR_WORDS)
            .zip(b.chunks(SECTOR_WORDS))
            .zip(a.chunks(SECTOR_WORDS))
            .all(|((f, b), a)| f == b || f == a)
    })
}
