//! The layouts of the maps' keys and values as their BTF describes them, so that a map pinned by
//! an earlier build is reused only when its fields lie where this build's programs read them.
//! The kernel's own checks, and [`super::bpf::check_pinned`], stop at the sizes: a reordered or
//! retyped field of the same total size would otherwise be read as this build's layout (the
//! reinterpretation `common/src/lib.rs` rules out; a layout change gets a new `ABI_VERSION`).
//!
//! A layout reads as a string: a struct as its members' names, byte offsets and layouts, an
//! array as its element's layout and length, anything else by its size alone (`4`). Type names
//! are left out, and so are the kinds of scalars: a kernel older than the object's BTF gets some
//! kinds rewritten by the loader (an `ENUM64` as a union, for example), never their sizes.
use std::{collections::BTreeMap, os::fd::BorrowedFd};

use anyhow::{Context as _, bail};

/// BTF kinds (`BTF_KIND_*`) this module reads; the others are skipped by their sizes.
mod kind {
    pub const INT: u32 = 1;
    pub const PTR: u32 = 2;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

const BTF_MAGIC: u16 = 0xeb9f;
/// Deepest nesting a layout follows (the map types nest two or three levels).
const MAX_DEPTH: usize = 16;

/// One type of a BTF blob, as far as layouts need it.
#[derive(Debug, Clone)]
enum Ty {
    /// A type of a known size and no inner layout (integer, enum, float, pointer...).
    Sized(u32),
    /// A type that stands for another (typedef, const, volatile, restrict, type tag, pointer
    /// targets are not followed).
    Alias(u32),
    Array {
        elem: u32,
        len: u32,
    },
    /// Struct or union: size and members (name offset, type, bit offset).
    Record {
        size: u32,
        members: Vec<(u32, u32, u32)>,
    },
    /// A pointer (BTF map definitions point at their key and value types).
    Ptr(u32),
    /// A variable (the map definitions in `.maps`).
    Var {
        name: u32,
        ty: u32,
    },
    /// A data section: its name and its variables' types.
    DataSec {
        name: u32,
        vars: Vec<u32>,
    },
    /// Anything else (functions, forward declarations, tags): no layout.
    Other,
}

/// A parsed BTF blob (the `.BTF` section of an object, or what the kernel holds of a loaded one).
pub struct Btf {
    /// Type id `i` is `types[i - 1]` (id 0 is `void`).
    types: Vec<Ty>,
    strings: Vec<u8>,
}

/// A map's key and value layouts (`None` where the BTF names no type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapLayout {
    /// The key's layout.
    pub key: Option<String>,
    /// The value's layout.
    pub value: Option<String>,
}

fn u32_at(b: &[u8], off: usize) -> anyhow::Result<u32> {
    let bytes = b.get(off..off + 4).context("BTF truncated")?;
    Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
}

impl Btf {
    /// Parses a little-endian BTF blob (the datapath's target, `bpfel`, and every host it runs
    /// on).
    pub fn parse(b: &[u8]) -> anyhow::Result<Self> {
        if b.len() < 24 || u16::from_le_bytes([b[0], b[1]]) != BTF_MAGIC {
            bail!("not a little-endian BTF blob");
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let tb = b
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .context("BTF type section out of bounds")?;
        let strings = b
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("BTF string section out of bounds")?
            .to_vec();
        let mut types = Vec::new();
        let mut at = 0;
        while at < tb.len() {
            let name = u32_at(tb, at)?;
            let info = u32_at(tb, at + 4)?;
            let size_or_type = u32_at(tb, at + 8)?;
            let (k, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let body = at + 12;
            let (ty, extra) = match k {
                kind::INT => (Ty::Sized(size_or_type), 4),
                kind::ENUM => (Ty::Sized(size_or_type), 8 * vlen),
                kind::ENUM64 => (Ty::Sized(size_or_type), 12 * vlen),
                kind::PTR => (Ty::Ptr(size_or_type), 0),
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    (Ty::Alias(size_or_type), 0)
                }
                kind::ARRAY => {
                    let elem = u32_at(tb, body)?;
                    (Ty::Array { elem, len: u32_at(tb, body + 8)? }, 12)
                }
                kind::STRUCT | kind::UNION => {
                    // With kind_flag, a member's offset word also holds its bit-field size.
                    let mask = if info >> 31 == 1 { 0x00ff_ffff } else { u32::MAX };
                    let members = (0..vlen)
                        .map(|i| {
                            let m = body + 12 * i;
                            Ok((u32_at(tb, m)?, u32_at(tb, m + 4)?, u32_at(tb, m + 8)? & mask))
                        })
                        .collect::<anyhow::Result<_>>()?;
                    (Ty::Record { size: size_or_type, members }, 12 * vlen)
                }
                kind::FUNC_PROTO => (Ty::Other, 8 * vlen),
                kind::VAR => (Ty::Var { name, ty: size_or_type }, 4),
                kind::DATASEC => {
                    let vars = (0..vlen)
                        .map(|i| u32_at(tb, body + 12 * i))
                        .collect::<anyhow::Result<_>>()?;
                    (Ty::DataSec { name, vars }, 12 * vlen)
                }
                kind::DECL_TAG => (Ty::Other, 4),
                // FWD, FUNC, FLOAT: nothing behind the common part.
                k if k <= 19 => (Ty::Other, 0),
                k => bail!("unknown BTF kind {k}"),
            };
            // A float is sized; it keeps its size in the common part.
            let ty = if k == 16 { Ty::Sized(size_or_type) } else { ty };
            types.push(ty);
            at = body + extra;
        }
        Ok(Self { types, strings })
    }

    fn ty(&self, id: u32) -> anyhow::Result<&Ty> {
        let i = (id as usize).checked_sub(1).context("BTF type 0 (void) has no layout")?;
        self.types.get(i).with_context(|| format!("BTF type {id} out of range"))
    }

    fn string(&self, off: u32) -> anyhow::Result<&str> {
        let s = self.strings.get(off as usize..).context("BTF string out of bounds")?;
        let end = s.iter().position(|&c| c == 0).context("BTF string not terminated")?;
        std::str::from_utf8(&s[..end]).context("BTF string not UTF-8")
    }

    /// The layout of type `id` (see the module's doc).
    pub fn layout(&self, id: u32) -> anyhow::Result<String> {
        let mut out = String::new();
        self.write_layout(id, 0, &mut out)?;
        Ok(out)
    }

    fn write_layout(&self, id: u32, depth: usize, out: &mut String) -> anyhow::Result<()> {
        use std::fmt::Write as _;
        if depth > MAX_DEPTH {
            bail!("BTF type {id} nests deeper than {MAX_DEPTH}");
        }
        match self.ty(id)? {
            Ty::Sized(size) => write!(out, "{size}")?,
            Ty::Ptr(_) => out.push('8'),
            Ty::Alias(t) => self.write_layout(*t, depth + 1, out)?,
            Ty::Array { elem, len } => {
                out.push('[');
                self.write_layout(*elem, depth + 1, out)?;
                write!(out, "; {len}]")?;
            }
            Ty::Record { size, members } => {
                write!(out, "{size}{{")?;
                for (i, (name, ty, bits)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    let at =
                        if bits % 8 == 0 { format!("{}", bits / 8) } else { format!("b{bits}") };
                    write!(out, "{}@{at}: ", self.string(*name)?)?;
                    self.write_layout(*ty, depth + 1, out)?;
                }
                out.push('}');
            }
            Ty::Var { .. } | Ty::DataSec { .. } | Ty::Other => {
                bail!("BTF type {id} has no layout")
            }
        }
        Ok(())
    }

    /// The maps an object defines in its `.maps` section (BTF map definitions: a struct whose
    /// `key` and `value` members point at the key and value types), by name.
    pub fn map_layouts(&self) -> anyhow::Result<BTreeMap<String, MapLayout>> {
        let mut maps = BTreeMap::new();
        for ty in &self.types {
            let Ty::DataSec { name, vars } = ty else { continue };
            if self.string(*name)? != ".maps" {
                continue;
            }
            for var in vars {
                let Ty::Var { name, ty } = self.ty(*var)? else { continue };
                let Ty::Record { members, .. } = self.resolve(*ty)? else { continue };
                let mut layout = MapLayout { key: None, value: None };
                for (m, mty, _) in members {
                    let slot = match self.string(*m)? {
                        "key" => &mut layout.key,
                        "value" => &mut layout.value,
                        _ => continue,
                    };
                    if let Ty::Ptr(target) = self.resolve(*mty)? {
                        *slot = Some(self.layout(*target)?);
                    }
                }
                maps.insert(self.string(*name)?.to_owned(), layout);
            }
        }
        Ok(maps)
    }

    /// The type `id` stands for, through aliases.
    fn resolve(&self, mut id: u32) -> anyhow::Result<&Ty> {
        for _ in 0..MAX_DEPTH {
            match self.ty(id)? {
                Ty::Alias(t) => id = *t,
                t => return Ok(t),
            }
        }
        bail!("BTF type {id}: aliases nest deeper than {MAX_DEPTH}")
    }
}

/// The key and value layouts of every map the eBPF object `obj` defines, by map name.
pub fn object_layouts(obj: &[u8]) -> anyhow::Result<BTreeMap<String, MapLayout>> {
    Btf::parse(elf_section(obj, ".BTF")?)?.map_layouts()
}

/// The bytes of the section `name` of the little-endian ELF64 file `elf`, read in place (the
/// object's programs are not parsed: the agent keeps its memory small).
fn elf_section<'a>(elf: &'a [u8], name: &str) -> anyhow::Result<&'a [u8]> {
    let u64_at = |off: usize| -> anyhow::Result<usize> {
        let b = elf.get(off..off + 8).context("ELF truncated")?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
    };
    let u16_at = |off: usize| -> anyhow::Result<usize> {
        let b = elf.get(off..off + 2).context("ELF truncated")?;
        Ok(usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    // ELF64, little endian.
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1]) {
        bail!("not a little-endian ELF64 object");
    }
    let (shoff, shentsize) = (u64_at(0x28)?, u16_at(0x3a)?);
    let (shnum, shstrndx) = (u16_at(0x3c)?, u16_at(0x3e)?);
    let header = |i: usize| shoff + i * shentsize;
    // Section header: name offset at 0, file offset at 24, size at 32.
    let bytes = |i: usize| -> anyhow::Result<&'a [u8]> {
        let (off, size) = (u64_at(header(i) + 24)?, u64_at(header(i) + 32)?);
        elf.get(off..off + size).context("ELF section out of bounds")
    };
    let names = bytes(shstrndx)?;
    for i in 0..shnum {
        let at = u32_at(elf, header(i))? as usize;
        let n = names.get(at..).context("ELF section name out of bounds")?;
        if n.split(|&c| c == 0).next() == Some(name.as_bytes()) {
            return bytes(i);
        }
    }
    bail!("the eBPF object has no {name} section")
}

/// A map's BTF as the kernel holds it: the id of its BTF object and its key and value type ids
/// (0 where it has none).
pub fn map_btf_ids(fd: BorrowedFd<'_>) -> anyhow::Result<(u32, u32, u32)> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: `bpf_map_info` is plain integers, for which all-zero is valid.
    let mut info: aya_obj::generated::bpf_map_info = unsafe { std::mem::zeroed() };
    obj_info(fd.as_raw_fd(), &mut info).context("reading the map's info")?;
    Ok((info.btf_id, info.btf_key_type_id, info.btf_value_type_id))
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info`.
fn obj_info<T>(fd: i32, info: &mut T) -> std::io::Result<()> {
    use super::sys;
    let mut attr = sys::attr();
    // SAFETY: union access; the info member is the one BPF_OBJ_GET_INFO_BY_FD reads.
    let u = unsafe { &mut attr.info };
    u.bpf_fd = fd as u32;
    u.info_len = size_of::<T>() as u32;
    u.info = info as *mut T as u64;
    // SAFETY: `info` is writable for `info_len` bytes for the duration of the call.
    unsafe { sys::bpf(sys::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr) }.map(drop)
}

/// The BTF object `id` as the kernel holds it (the BTF a loaded object brought).
pub fn kernel_btf(id: u32) -> anyhow::Result<Btf> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

    use super::sys;
    let mut attr = sys::attr();
    attr.__bindgen_anon_6.__bindgen_anon_1.btf_id = id;
    // SAFETY: a plain attribute block without pointers.
    let fd = unsafe { sys::bpf(sys::bpf_cmd::BPF_BTF_GET_FD_BY_ID, &mut attr) }
        .with_context(|| format!("opening BTF object {id}"))?;
    // SAFETY: the kernel returned a new file descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: `bpf_btf_info` is plain integers, for which all-zero is valid.
    let mut info: aya_obj::generated::bpf_btf_info = unsafe { std::mem::zeroed() };
    obj_info(fd.as_raw_fd(), &mut info).with_context(|| format!("sizing BTF object {id}"))?;
    let mut data = vec![0u8; info.btf_size as usize];
    // SAFETY: as above.
    let mut info: aya_obj::generated::bpf_btf_info = unsafe { std::mem::zeroed() };
    info.btf = data.as_mut_ptr() as u64;
    info.btf_size = data.len() as u32;
    obj_info(fd.as_raw_fd(), &mut info).with_context(|| format!("reading BTF object {id}"))?;
    Btf::parse(&data).with_context(|| format!("BTF object {id}"))
}

/// Reads the BTF objects pinned maps point at, each once.
#[derive(Default)]
pub struct KernelBtfs(BTreeMap<u32, Btf>);

impl KernelBtfs {
    /// The key and value layouts of the map `fd` as its BTF describes them; `None` for a map
    /// without BTF (nothing to compare).
    pub fn map_layout(&mut self, fd: BorrowedFd<'_>) -> anyhow::Result<Option<MapLayout>> {
        let (btf_id, key, value) = map_btf_ids(fd)?;
        if btf_id == 0 {
            return Ok(None);
        }
        let btf = match self.0.entry(btf_id) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(kernel_btf(btf_id)?),
        };
        let side = |id: u32| (id != 0).then(|| btf.layout(id)).transpose();
        Ok(Some(MapLayout { key: side(key)?, value: side(value)? }))
    }
}

/// Where a pinned map's layout differs from this build's: `None` where they agree, or where one
/// side does not say (a map pinned without BTF, a side without a type).
pub fn layout_difference(pinned: &MapLayout, built: &MapLayout) -> Option<String> {
    let mut diffs = Vec::new();
    for (what, p, b) in [("key", &pinned.key, &built.key), ("value", &pinned.value, &built.value)] {
        if let (Some(p), Some(b)) = (p, b)
            && p != b
        {
            diffs.push(format!("{what} {p} where this build has {b}"));
        }
    }
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_objects_maps_read_as_their_rust_types() {
        let maps = object_layouts(crate::EBPF_OBJECT).unwrap();
        let be = &maps[kproxy_common::names::BACKENDS4];
        assert_eq!(be.key.as_deref(), Some("4"));
        // Backend4: addr, port, proto, flags.
        assert_eq!(be.value.as_deref(), Some("8{addr@0: 4, port@4: 2, proto@6: 1, flags@7: 1}"));
        let ct = &maps[kproxy_common::names::CT4];
        let tuple = ct.key.as_deref().unwrap();
        assert!(tuple.starts_with(&format!("{}{{", size_of::<kproxy_common::Tuple4>())), "{tuple}");
        let value = ct.value.as_deref().unwrap();
        assert!(value.starts_with(&format!("{}{{", size_of::<kproxy_common::Ct4Value>())));
        // Every pinned map of the ABI is there.
        for name in pinned_maps() {
            assert!(maps.contains_key(name), "{name} missing");
        }
    }

    /// The record of ABI v`ABI_VERSION`'s layouts: `common/abi/v<N>.layout`, one line per map
    /// (`name key <layout> value <layout>`).
    fn record_path() -> std::path::PathBuf {
        let v = kproxy_common::ABI_VERSION;
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../common/abi/v{v}.layout"))
    }

    fn render(maps: &BTreeMap<String, MapLayout>) -> String {
        let side = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
        maps.iter()
            .map(|(n, l)| format!("{n} key {} value {}\n", side(&l.key), side(&l.value)))
            .collect()
    }

    /// The layouts of this build's maps against the record of its ABI version: a map whose key
    /// or value changed needs a new `ABI_VERSION` (maps pinned by the earlier build would be
    /// refused at load, see `check_pinned_layout`); a map added or removed only needs the
    /// record updated. `KPROXY_BLESS=1` writes the record from this build.
    /// The names of the maps kept pinned from one agent to the next (per-CPU scratch and cache
    /// maps live and die with their programs).
    fn pinned_maps() -> impl Iterator<Item = &'static str> {
        use crate::dataplane::{bpf, bpf6};
        bpf::MAP_SPECS
            .iter()
            .chain(&bpf::GUARD_MAP_SPECS)
            .chain(&bpf6::MAP_SPECS6)
            .chain(&bpf::GUARD_MAP_SPECS6)
            .map(|s| s.name)
    }

    #[test]
    fn map_layouts_match_the_record_of_their_abi_version() {
        let mut built = object_layouts(crate::EBPF_OBJECT).unwrap();
        built.retain(|name, _| pinned_maps().any(|p| p == name));
        let path = record_path();
        if std::env::var_os("KPROXY_BLESS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, render(&built)).unwrap();
        }
        let record = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e} (KPROXY_BLESS=1 records this build's layouts)", path.display())
        });
        let recorded: BTreeMap<&str, &str> =
            record.lines().filter_map(|l| l.split_once(" key ")).collect();
        let v = kproxy_common::ABI_VERSION;
        for (name, layout) in &built {
            let line = render(&BTreeMap::from([(name.clone(), layout.clone())]));
            let now = line.trim_end().split_once(" key ").unwrap().1;
            match recorded.get(name.as_str()) {
                Some(r) => assert_eq!(
                    *r, now,
                    "{name}: layout changed under ABI v{v}: maps pinned by earlier builds would \
                     be refused; give the change a new ABI_VERSION (common/src/lib.rs) and a \
                     migration of the entries that must survive, then KPROXY_BLESS=1"
                ),
                None => panic!("{name}: not in {} (KPROXY_BLESS=1 adds it)", path.display()),
            }
        }
        for name in recorded.keys() {
            assert!(built.contains_key(*name), "{name}: gone (KPROXY_BLESS=1 updates the record)");
        }
    }

    #[test]
    fn a_reordered_or_retyped_field_is_a_difference() {
        let built = MapLayout { key: Some("4".into()), value: Some("8{a@0: 4, b@4: 4}".into()) };
        let swapped = MapLayout { key: Some("4".into()), value: Some("8{b@0: 4, a@4: 4}".into()) };
        let diff = layout_difference(&swapped, &built).expect("a difference");
        assert!(diff.starts_with("value 8{b@0"), "{diff}");
        assert_eq!(layout_difference(&built.clone(), &built), None);
        let unknown = MapLayout { key: None, value: None };
        assert_eq!(layout_difference(&unknown, &built), None, "nothing to compare");
    }
}
