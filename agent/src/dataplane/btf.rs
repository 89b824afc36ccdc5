//! The layouts of the maps' keys and values as their BTF describes them, so that a map pinned by
//! an earlier build is reused only when its fields lie where this build's programs read them.
//! The kernel's own checks, and [`super::bpf::check_pinned`], stop at the sizes: a reordered or
//! retyped field of the same total size would otherwise be read as this build's layout (the
//! reinterpretation `common/src/lib.rs` rules out; a layout change gets a new `ABI_VERSION`).
//!
//! A layout reads as a string: a struct as its members' names, byte offsets and layouts, an
//! array as its element's layout and length, anything else by its size alone (`4`), unions
//! and empty structs included. Type names are left out, and so are the kinds of scalars: a
//! kernel older than the object's BTF gets some kinds rewritten by the loader (aya turns an
//! `ENUM64` into a union and a `FLOAT` into an empty struct), never their sizes.
//!
//! Two layouts of one map are compatible ([`compatible`]) when they are equal, or when the
//! fields only one of them has lie in the other's padding (members named `_pad...`): ABI v1
//! has given padding a meaning more than once (a field that reads 0 in entries written
//! before it), and a build reads the maps an earlier build of the same version pinned.
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
    pub key: Option<TypeLayout>,
    /// The value's layout.
    pub value: Option<TypeLayout>,
}

/// The layout of one type: its text (see the module's doc) and its fields, flattened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeLayout {
    /// The layout as one string.
    pub text: String,
    fields: Vec<Field>,
}

/// A field of a layout with structs flattened: its path (`data.addr`), where it starts and
/// how long it is (bits), and its layout (a scalar's size, an array's layout).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Field {
    path: String,
    bit: u32,
    bits: u32,
    text: String,
}

impl Field {
    fn is_pad(&self) -> bool {
        self.path.rsplit('.').next().is_some_and(|n| n.starts_with("_pad"))
    }
}

/// Whether `pinned` (a map's key or value as an earlier build laid it out) reads right with
/// `built` (this build's): equal, or every field only one side has lies in the padding of the
/// other (a field both have sits at the same place with the same layout). The error names the
/// first field that does not.
pub fn compatible(pinned: &TypeLayout, built: &TypeLayout) -> Result<(), String> {
    if pinned.text == built.text {
        return Ok(());
    }
    for (side, other, which) in [(pinned, built, "pinned"), (built, pinned, "this build's")] {
        for f in side.fields.iter().filter(|f| !f.is_pad()) {
            let named = other.fields.iter().find(|o| o.path == f.path);
            let same = named.is_some_and(|o| o.bit == f.bit && o.text == f.text);
            // A field the other side lacks may lie in its padding; one it has elsewhere may not.
            let in_padding = named.is_none()
                && (f.bit..f.bit + f.bits).all(|b| {
                    other.fields.iter().any(|o| o.is_pad() && (o.bit..o.bit + o.bits).contains(&b))
                });
            if !same && !in_padding {
                return Err(format!(
                    "{which} field {} (byte {}, {}) has no counterpart: pinned {}, this build {}",
                    f.path,
                    f.bit / 8,
                    f.text,
                    pinned.text,
                    built.text
                ));
            }
        }
    }
    Ok(())
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
                // A union reads as its size (aya stands one in for an ENUM64 on older kernels).
                kind::UNION => (Ty::Sized(size_or_type), 12 * vlen),
                // An empty struct too (aya stands one in for a FLOAT).
                kind::STRUCT if vlen == 0 => (Ty::Sized(size_or_type), 0),
                kind::STRUCT => {
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
    pub fn layout(&self, id: u32) -> anyhow::Result<TypeLayout> {
        let mut fields = Vec::new();
        self.collect_fields(id, "", 0, 0, &mut fields)?;
        Ok(TypeLayout { text: self.text(id)?, fields })
    }

    fn text(&self, id: u32) -> anyhow::Result<String> {
        let mut out = String::new();
        self.write_layout(id, 0, &mut out)?;
        Ok(out)
    }

    /// Size of type `id`, bytes.
    fn size(&self, id: u32, depth: usize) -> anyhow::Result<u32> {
        if depth > MAX_DEPTH {
            bail!("BTF type {id} nests deeper than {MAX_DEPTH}");
        }
        Ok(match self.ty(id)? {
            Ty::Sized(size) | Ty::Record { size, .. } => *size,
            Ty::Ptr(_) => 8,
            Ty::Alias(t) => self.size(*t, depth + 1)?,
            Ty::Array { elem, len } => self.size(*elem, depth + 1)? * len,
            Ty::Var { .. } | Ty::DataSec { .. } | Ty::Other => bail!("BTF type {id} has no size"),
        })
    }

    /// Appends the fields of type `id` at bit `bit` to `out`, structs flattened.
    fn collect_fields(
        &self,
        id: u32,
        path: &str,
        bit: u32,
        depth: usize,
        out: &mut Vec<Field>,
    ) -> anyhow::Result<()> {
        if depth > MAX_DEPTH {
            bail!("BTF type {id} nests deeper than {MAX_DEPTH}");
        }
        match self.ty(id)? {
            Ty::Alias(t) => self.collect_fields(*t, path, bit, depth + 1, out)?,
            Ty::Record { members, .. } => {
                for (name, ty, at) in members {
                    let name = self.string(*name)?;
                    let sub =
                        if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") };
                    self.collect_fields(*ty, &sub, bit + at, depth + 1, out)?;
                }
            }
            _ => out.push(Field {
                path: path.to_owned(),
                bit,
                bits: self.size(id, depth)? * 8,
                text: self.text(id)?,
            }),
        }
        Ok(())
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

/// Where a pinned map's layout does not read right with this build's ([`compatible`]): `None`
/// where it does, or where one side does not say (a map pinned without BTF, a side without a
/// type).
pub fn layout_difference(pinned: &MapLayout, built: &MapLayout) -> Option<String> {
    let mut diffs = Vec::new();
    for (what, p, b) in [("key", &pinned.key, &built.key), ("value", &pinned.value, &built.value)] {
        if let (Some(p), Some(b)) = (p, b)
            && let Err(e) = compatible(p, b)
        {
            diffs.push(format!("{what}: {e}"));
        }
    }
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(l: &Option<TypeLayout>) -> Option<&str> {
        l.as_ref().map(|l| l.text.as_str())
    }

    /// A layout read back from its text (the record's form): its size, bytes.
    fn parse_text(t: &str) -> TypeLayout {
        fn layout(t: &str, path: &str, bit: u32, out: &mut Vec<Field>) -> (u32, usize) {
            if let Some(rest) = t.strip_prefix('[') {
                let (size, used) = layout(rest, path, bit, &mut Vec::new());
                let rest = &rest[used..];
                let rest = rest.strip_prefix("; ").unwrap();
                let end = rest.find(']').unwrap();
                let n: u32 = rest[..end].parse().unwrap();
                let len = 1 + used + 2 + end + 1;
                out.push(Field {
                    path: path.into(),
                    bit,
                    bits: size * n * 8,
                    text: t[..len].into(),
                });
                return (size * n, len);
            }
            let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let size: u32 = t[..digits].parse().unwrap();
            if !t[digits..].starts_with('{') {
                out.push(Field {
                    path: path.into(),
                    bit,
                    bits: size * 8,
                    text: t[..digits].into(),
                });
                return (size, digits);
            }
            let mut at = digits + 1;
            loop {
                let rest = &t[at..];
                if let Some(r) = rest.strip_prefix('}') {
                    let _ = r;
                    return (size, at + 1);
                }
                let rest = rest.strip_prefix(", ").unwrap_or(rest);
                at = t.len() - rest.len();
                let name_end = rest.find('@').unwrap();
                let colon = rest.find(": ").unwrap();
                let off: u32 = rest[name_end + 1..colon].parse().unwrap();
                let name = &rest[..name_end];
                let sub = if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") };
                let (_, used) = layout(&rest[colon + 2..], &sub, bit + off * 8, out);
                at += colon + 2 + used;
            }
        }
        let mut fields = Vec::new();
        let (_, used) = layout(t, "", 0, &mut fields);
        assert_eq!(used, t.len(), "{t}");
        TypeLayout { text: t.into(), fields }
    }

    #[test]
    fn the_objects_maps_read_as_their_rust_types() {
        let maps = object_layouts(crate::EBPF_OBJECT).unwrap();
        let be = &maps[kproxy_common::names::BACKENDS4];
        assert_eq!(text(&be.key), Some("4"));
        // Backend4: addr, port, proto, flags.
        assert_eq!(text(&be.value), Some("8{addr@0: 4, port@4: 2, proto@6: 1, flags@7: 1}"));
        let ct = &maps[kproxy_common::names::CT4];
        let tuple = text(&ct.key).unwrap();
        assert!(tuple.starts_with(&format!("{}{{", size_of::<kproxy_common::Tuple4>())), "{tuple}");
        let value = text(&ct.value).unwrap();
        assert!(value.starts_with(&format!("{}{{", size_of::<kproxy_common::Ct4Value>())));
        // The text reads back as the same fields.
        for l in maps.values().flat_map(|m| [&m.key, &m.value]).flatten() {
            assert_eq!(parse_text(&l.text), *l);
        }
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
        let side = |s: &Option<TypeLayout>| text(s).unwrap_or("-").to_owned();
        maps.iter()
            .map(|(n, l)| format!("{n} key {} value {}\n", side(&l.key), side(&l.value)))
            .collect()
    }

    /// The names of the maps kept pinned from one agent to the next (per-CPU scratch and cache
    /// maps live and die with their programs).
    fn pinned_maps() -> impl Iterator<Item = &'static str> {
        crate::dataplane::bpf::pinned_map_specs().map(|s| s.name)
    }

    /// The layouts of this build's maps against the record of its ABI version: a map whose key
    /// or value no longer reads the recorded layout right ([`compatible`]) needs a new
    /// `ABI_VERSION` (the agent would refuse maps pinned by earlier builds); a field given to
    /// padding, or a map added or removed, only needs the record updated. `KPROXY_BLESS=1`
    /// writes the record from this build.
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
        let recorded: BTreeMap<&str, (&str, &str)> = record
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.split_once(" key ")?;
                Some((name, rest.split_once(" value ")?))
            })
            .collect();
        let v = kproxy_common::ABI_VERSION;
        for (name, layout) in &built {
            let Some((key, value)) = recorded.get(name.as_str()) else {
                panic!("{name}: not in {} (KPROXY_BLESS=1 adds it)", path.display())
            };
            for (what, r, now) in [("key", key, &layout.key), ("value", value, &layout.value)] {
                let now = now.as_ref().map(|l| l.text.as_str()).unwrap_or("-");
                if *r == now {
                    continue;
                }
                let read = if *r != "-" && now != "-" {
                    compatible(&parse_text(r), &parse_text(now))
                } else {
                    Err("one side has no type".into())
                };
                match read {
                    Ok(()) => panic!(
                        "{name} {what}: {r} became {now}, which reads maps pinned under ABI v{v} \
                         right (new fields in padding): KPROXY_BLESS=1 records it"
                    ),
                    Err(e) => panic!(
                        "{name} {what}: layout changed under ABI v{v} ({e}): maps pinned by \
                         earlier builds would be refused; give the change a new ABI_VERSION \
                         (common/src/lib.rs), then KPROXY_BLESS=1"
                    ),
                }
            }
        }
        for name in recorded.keys() {
            assert!(built.contains_key(*name), "{name}: gone (KPROXY_BLESS=1 updates the record)");
        }
    }

    #[test]
    fn a_field_given_to_padding_reads_both_ways_a_moved_one_does_not() {
        let old = parse_text("16{backend_id@0: 4, _pad@4: 4, last_used_ns@8: 8}");
        let new = parse_text("16{backend_id@0: 4, slot@4: 2, _pad@6: 2, last_used_ns@8: 8}");
        assert_eq!(compatible(&old, &new), Ok(()), "an upgrade reads the old entries");
        assert_eq!(compatible(&new, &old), Ok(()), "a rollback ignores the new field");
        let nested = parse_text("12{a@0: 8{x@0: 4, _pad@4: [1; 4]}, b@8: 4}");
        let nested2 = parse_text("12{a@0: 8{x@0: 4, y@4: 2, _pad@6: [1; 2]}, b@8: 4}");
        assert_eq!(compatible(&nested, &nested2), Ok(()));
        let swapped = parse_text("16{backend_id@0: 4, _pad@4: 4, last_used_ns@8: 8}");
        let moved = parse_text("16{_pad@0: 4, backend_id@4: 4, last_used_ns@8: 8}");
        let err = compatible(&swapped, &moved).unwrap_err();
        assert!(err.contains("field backend_id (byte 0"), "{err}");
        let grown = parse_text("16{backend_id@0: 4, slot@4: 8, last_used_ns@8: 8}");
        assert!(compatible(&old, &grown).is_err(), "a field past the padding");
        let retyped = parse_text("16{backend_id@0: [2; 2], _pad@4: 4, last_used_ns@8: 8}");
        assert!(compatible(&old, &retyped).is_err(), "a field of another type");
    }

    #[test]
    fn unions_and_empty_structs_read_as_their_size() {
        // BTF: [1] u32, [2] union { a: u32 } of 8 bytes, [3] struct {} of 8 bytes (aya's
        // stand-ins for ENUM64 and FLOAT), [4] struct S { u: [2], f: [3] }.
        let strings = b"\0u32\0a\0S\0u\0f\0";
        let types: [u32; 22] = [
            1,
            1 << 24,
            4,
            32, // [1] INT "u32"
            0,
            (5 << 24) | 1,
            8,
            5,
            1,
            0, // [2] UNION of 8 bytes: member "a" (u32 at bit 0)
            0,
            4 << 24,
            8, // [3] empty STRUCT of 8 bytes
            7,
            (4 << 24) | 2,
            16,
            9,
            2,
            0,
            11,
            3,
            64, // [4] STRUCT "S": "u" at 0, "f" at bit 64
        ];
        let type_len = (types.len() * 4) as u32;
        let mut blob: Vec<u8> = vec![0x9f, 0xeb, 1, 0];
        for w in [24, 0, type_len, type_len, strings.len() as u32] {
            blob.extend(u32::to_le_bytes(w));
        }
        blob.extend(types.iter().flat_map(|w| w.to_le_bytes()));
        blob.extend(strings);
        let btf = Btf::parse(&blob).unwrap();
        assert_eq!(btf.layout(4).unwrap().text, "16{u@0: 8, f@8: 8}");
    }

    #[test]
    fn a_reordered_or_retyped_field_is_a_difference() {
        let layout = |v: &str| MapLayout { key: Some(parse_text("4")), value: Some(parse_text(v)) };
        let built = layout("8{a@0: 4, b@4: 4}");
        let diff = layout_difference(&layout("8{b@0: 4, a@4: 4}"), &built).expect("a difference");
        assert!(diff.starts_with("value: pinned field b (byte 0"), "{diff}");
        assert_eq!(layout_difference(&built.clone(), &built), None);
        let unknown = MapLayout { key: None, value: None };
        assert_eq!(layout_difference(&unknown, &built), None, "nothing to compare");
    }
}
