//! [`SharedStr`]: the model's immutable, shared string, one word wide.
//!
//! Names and short values repeat across the model's indexes and the syncer's records (a service's
//! name keys the tracker's and the syncer's tables and is held by its claims; a node name is
//! held by every endpoint on that node), so each distinct string is allocated once and shared.
//! `Arc<str>` does that but is two words (pointer and length); the agent holds millions of these
//! handles at tens of thousands of services, so here the length sits in the allocation beside the
//! reference count and the bytes: one word per handle, one allocation per string, as before.
use std::{
    alloc::{Layout, alloc, dealloc, handle_alloc_error},
    fmt,
    hash::{Hash, Hasher},
    ptr::NonNull,
    sync::atomic::{AtomicUsize, Ordering, fence},
};

/// What precedes the bytes of a [`SharedStr`] in its allocation.
#[repr(C)]
struct Header {
    /// Number of handles.
    count: AtomicUsize,
    /// Length of the string in bytes.
    len: usize,
}

/// An immutable string whose clones share one allocation (see the module documentation).
/// Transparent, so that an `Option<SharedStr>` is one pointer, null for `None` ([`Self::into_word`]).
#[repr(transparent)]
pub struct SharedStr(NonNull<Header>);

// SAFETY: the string is immutable and the count atomic, as in `Arc<str>`.
unsafe impl Send for SharedStr {}
// SAFETY: as above.
unsafe impl Sync for SharedStr {}

const _: () = assert!(
    size_of::<SharedStr>() == size_of::<usize>()
        && size_of::<Option<SharedStr>>() == size_of::<usize>()
        && align_of::<Header>() >= 2
);

/// The allocation of a string of `len` bytes.
fn layout(len: usize) -> Layout {
    // Fails (a panic, as `Arc<str>`'s allocation) only for lengths within a header of isize::MAX.
    let (l, _) = Layout::new::<Header>()
        .extend(Layout::array::<u8>(len).expect("string length"))
        .expect("string layout");
    l.pad_to_align()
}

impl SharedStr {
    /// The string.
    pub fn as_str(&self) -> &str {
        // SAFETY: the header is live while a handle is; `len` bytes of valid UTF-8 follow it
        // (written once by `new`, never changed).
        unsafe {
            let h = self.0.as_ptr();
            let data = (h as *const u8).add(size_of::<Header>());
            std::str::from_utf8_unchecked(std::slice::from_raw_parts(data, (*h).len))
        }
    }

    /// Whether `a` and `b` are one allocation.
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        a.0 == b.0
    }

    /// Whether another handle shares this string (the tracker drops the strings of its
    /// interning table that nothing else holds).
    pub fn is_shared(&self) -> bool {
        // SAFETY: the header is live while a handle is.
        unsafe { (*self.0.as_ptr()).count.load(Ordering::Relaxed) > 1 }
    }

    /// The handle as one word (0 for `None`; the allocation is aligned to 8, so the low three bits
    /// are clear), to be turned back by [`Self::from_word`].
    pub fn into_word(s: Option<Self>) -> usize {
        std::mem::ManuallyDrop::new(s).as_ref().map_or(0, |h| h.0.as_ptr() as usize)
    }

    /// The handle of a word from [`Self::into_word`].
    ///
    /// # Safety
    /// `w` comes from `into_word` and is turned back once.
    pub unsafe fn from_word(w: usize) -> Option<Self> {
        NonNull::new(w as *mut Header).map(Self)
    }

    /// The handle a word from [`Self::into_word`] stands for, borrowed.
    ///
    /// # Safety
    /// `*w` comes from `into_word` and is not turned back while the borrow lives.
    pub unsafe fn borrow_word(w: &usize) -> &Option<Self> {
        // SAFETY: `SharedStr` is a transparent `NonNull`, so `Option<SharedStr>` is one pointer
        // with `None` as null: the layout of the word.
        unsafe { &*(w as *const usize as *const Option<Self>) }
    }

    fn new(s: &str) -> Self {
        let layout = layout(s.len());
        // SAFETY: the layout has a non-zero size (the header).
        let p = unsafe { alloc(layout) } as *mut Header;
        let Some(nn) = NonNull::new(p) else { handle_alloc_error(layout) };
        // SAFETY: `p` is a fresh allocation of `layout`: a header, then room for the bytes.
        unsafe {
            p.write(Header { count: AtomicUsize::new(1), len: s.len() });
            std::ptr::copy_nonoverlapping(
                s.as_ptr(),
                (p as *mut u8).add(size_of::<Header>()),
                s.len(),
            );
        }
        Self(nn)
    }
}

impl Clone for SharedStr {
    fn clone(&self) -> Self {
        // SAFETY: the header is live while a handle is.
        let old = unsafe { (*self.0.as_ptr()).count.fetch_add(1, Ordering::Relaxed) };
        // As `Arc`: a count past isize::MAX can only come from leaked handles.
        if old > isize::MAX as usize {
            std::process::abort();
        }
        Self(self.0)
    }
}

impl Drop for SharedStr {
    fn drop(&mut self) {
        let h = self.0.as_ptr();
        // SAFETY: the header is live while this handle is; the last handle frees it after every
        // other handle's accesses (the release decrements, then the acquire fence), as `Arc`.
        unsafe {
            if (*h).count.fetch_sub(1, Ordering::Release) != 1 {
                return;
            }
            fence(Ordering::Acquire);
            let len = (*h).len;
            dealloc(h as *mut u8, layout(len));
        }
    }
}

impl Default for SharedStr {
    fn default() -> Self {
        Self::new("")
    }
}

impl std::ops::Deref for SharedStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for SharedStr {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for SharedStr {
    fn from(s: String) -> Self {
        Self::new(&s)
    }
}

// Equality, order and hash are the string's (a table keyed by `SharedStr` is looked up with a
// `&str`, through `Borrow`).
impl PartialEq for SharedStr {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0 || self.as_str() == other.as_str()
    }
}

impl Eq for SharedStr {}

impl PartialOrd for SharedStr {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SharedStr {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for SharedStr {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for SharedStr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl PartialEq<str> for SharedStr {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for SharedStr {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeSet, HashMap},
        hash::BuildHasher,
    };

    use super::*;

    fn count(s: &SharedStr) -> usize {
        // SAFETY: the header is live while `s` is.
        unsafe { (*s.0.as_ptr()).count.load(Ordering::Relaxed) }
    }

    #[test]
    fn clones_share_one_allocation_and_the_last_frees_it() {
        let a = SharedStr::from("kube-system");
        let b = a.clone();
        assert!(SharedStr::ptr_eq(&a, &b), "a clone is the same allocation");
        assert!(!SharedStr::ptr_eq(&a, &SharedStr::from("kube-system")));
        assert_eq!(count(&a), 2);
        assert!(a.is_shared());
        drop(b);
        assert_eq!(count(&a), 1);
        assert!(!a.is_shared());
        assert_eq!(&*a, "kube-system");
        // Clones dropped on other threads, as the model's short-lived thread does.
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let c = a.clone();
                std::thread::spawn(move || c.len())
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 11);
        }
        assert_eq!(count(&a), 1);
    }

    #[test]
    fn behaves_as_its_string() {
        let words = ["", "a", "b", "ab", "é", "ClusterIP", &"x".repeat(1000)];
        for w in words {
            let s = SharedStr::from(w);
            assert_eq!(s.as_str(), w);
            assert_eq!(s, *w);
            assert_eq!(s, SharedStr::from(w.to_string()));
            assert_eq!(format!("{s}"), w);
            assert_eq!(format!("{s:?}"), format!("{w:?}"));
            assert_eq!(serde_json::to_string(&s).unwrap(), serde_json::to_string(w).unwrap());
            // Hash as the string, so that a table keyed by it is looked up with a `&str`.
            let st = std::collections::hash_map::RandomState::new();
            assert_eq!(st.hash_one(&s), st.hash_one(w));
        }
        assert_eq!(SharedStr::default(), "");
        let sorted: BTreeSet<SharedStr> =
            ["b", "a", "c", "a"].into_iter().map(Into::into).collect();
        assert_eq!(sorted.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        let mut m: HashMap<SharedStr, u32> = HashMap::new();
        m.insert("default".into(), 1);
        assert_eq!(m.get("default"), Some(&1));
        assert_eq!(m.get("other"), None);
        assert_ne!(SharedStr::from("a"), SharedStr::from("b"));
    }
}
