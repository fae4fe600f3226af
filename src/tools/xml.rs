//! thin_dump's XML metadata format: what `uthin dump` writes and `uthin restore` reads, the same
//! text `thin_dump` / `thin_restore` use, so either tool can read the other's output.
//!
//! ```xml
//! <superblock uuid="" time="1" transaction="3" flags="0" version="2" data_block_size="128" nr_data_blocks="1000">
//!   <device dev_id="1" mapped_blocks="12" transaction="0" creation_time="0" snap_time="1">
//!     <range_mapping origin_begin="0" data_begin="0" length="10" time="0"/>
//!     <single_mapping origin_block="20" data_block="30" time="0"/>
//!   </device>
//! </superblock>
//! ```
//!
//! `data_block_size` is in 512-byte sectors. Runs of consecutive virtual blocks mapped to
//! consecutive data blocks with the same time are written as one `range_mapping`.

use std::collections::HashMap;
use std::fmt::Write as _;

/// The `<superblock>` element.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XmlSuperblock {
    /// `uuid` (usually empty).
    pub uuid: String,
    /// Pool time.
    pub time: u32,
    /// Transaction id.
    pub transaction: u64,
    /// Superblock flags.
    pub flags: u32,
    /// Metadata version.
    pub version: u32,
    /// Data block size in sectors.
    pub data_block_size: u32,
    /// Number of data blocks.
    pub nr_data_blocks: u64,
    /// The devices, in dev id order.
    pub devices: Vec<XmlDevice>,
}

/// A `<device>` element.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XmlDevice {
    /// Device id.
    pub dev_id: u32,
    /// Mapped blocks from the details.
    pub mapped_blocks: u64,
    /// Transaction id at creation.
    pub transaction: u64,
    /// Creation time.
    pub creation_time: u32,
    /// Snapshotted time.
    pub snap_time: u32,
    /// Its mappings, in virtual block order, one entry per virtual block.
    pub mappings: Vec<XmlMapping>,
}

/// One mapping: virtual block → data block, with its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XmlMapping {
    /// Virtual block.
    pub origin: u64,
    /// Data block.
    pub data: u64,
    /// Time.
    pub time: u32,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Writes the XML exactly as thin_dump 0.9 formats it (two-space indentation, runs merged).
pub fn write_xml(sb: &XmlSuperblock) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<superblock uuid=\"{}\" time=\"{}\" transaction=\"{}\" flags=\"{}\" version=\"{}\" data_block_size=\"{}\" nr_data_blocks=\"{}\">",
        escape(&sb.uuid),
        sb.time,
        sb.transaction,
        sb.flags,
        sb.version,
        sb.data_block_size,
        sb.nr_data_blocks
    );
    for d in &sb.devices {
        let _ = writeln!(
            out,
            "  <device dev_id=\"{}\" mapped_blocks=\"{}\" transaction=\"{}\" creation_time=\"{}\" snap_time=\"{}\">",
            d.dev_id, d.mapped_blocks, d.transaction, d.creation_time, d.snap_time
        );
        let mut i = 0;
        while i < d.mappings.len() {
            let first = d.mappings[i];
            let mut len = 1u64;
            while let Some(next) = d.mappings.get(i + len as usize) {
                if next.origin == first.origin + len
                    && next.data == first.data + len
                    && next.time == first.time
                {
                    len += 1;
                } else {
                    break;
                }
            }
            if len == 1 {
                let _ = writeln!(
                    out,
                    "    <single_mapping origin_block=\"{}\" data_block=\"{}\" time=\"{}\"/>",
                    first.origin, first.data, first.time
                );
            } else {
                let _ = writeln!(
                    out,
                    "    <range_mapping origin_begin=\"{}\" data_begin=\"{}\" length=\"{}\" time=\"{}\"/>",
                    first.origin, first.data, len, first.time
                );
            }
            i += len as usize;
        }
        let _ = writeln!(out, "  </device>");
    }
    let _ = writeln!(out, "</superblock>");
    out
}

/// A tag of the XML: name, attributes, and whether it opens, closes or is self-closing.
struct Tag {
    name: String,
    attrs: HashMap<String, String>,
    closing: bool,
    self_closing: bool,
    line: usize,
}

fn parse_tags(text: &str) -> Result<Vec<Tag>, String> {
    let mut tags = Vec::new();
    let mut rest = text;
    let mut line = 1;
    while let Some(start) = rest.find('<') {
        line += rest[..start].matches('\n').count();
        let after = &rest[start + 1..];
        if let Some(stripped) = after.strip_prefix("!--") {
            let end = stripped
                .find("-->")
                .ok_or_else(|| format!("line {line}: unterminated comment"))?;
            line += stripped[..end].matches('\n').count();
            rest = &stripped[end + 3..];
            continue;
        }
        let end = after
            .find('>')
            .ok_or_else(|| format!("line {line}: unterminated tag"))?;
        let body = &after[..end];
        let tag_line = line;
        line += body.matches('\n').count();
        rest = &after[end + 1..];
        if body.starts_with('?') || body.starts_with('!') {
            continue;
        }
        let closing = body.starts_with('/');
        let self_closing = body.ends_with('/');
        let body = body.trim_start_matches('/').trim_end_matches('/').trim();
        let name_end = body.find(char::is_whitespace).unwrap_or(body.len());
        let name = body[..name_end].to_string();
        let mut attrs = HashMap::new();
        let mut a = body[name_end..].trim_start();
        while !a.is_empty() {
            let eq = a
                .find('=')
                .ok_or_else(|| format!("line {tag_line}: attribute without value in <{name}>"))?;
            let key = a[..eq].trim().to_string();
            let v = a[eq + 1..].trim_start();
            let quote = v
                .chars()
                .next()
                .filter(|c| *c == '"' || *c == '\'')
                .ok_or_else(|| format!("line {tag_line}: unquoted value of {key} in <{name}>"))?;
            let close = v[1..].find(quote).ok_or_else(|| {
                format!("line {tag_line}: unterminated value of {key} in <{name}>")
            })?;
            attrs.insert(key, unescape(&v[1..1 + close]));
            a = v[close + 2..].trim_start();
        }
        tags.push(Tag {
            name,
            attrs,
            closing,
            self_closing,
            line: tag_line,
        });
    }
    Ok(tags)
}

impl Tag {
    fn num<T: std::str::FromStr>(&self, key: &str) -> Result<T, String> {
        let v = self.attrs.get(key).ok_or_else(|| {
            format!(
                "line {}: <{}> lacks the attribute {key}",
                self.line, self.name
            )
        })?;
        v.parse().map_err(|_| {
            format!(
                "line {}: {key}=\"{v}\" in <{}> is not a valid number",
                self.line, self.name
            )
        })
    }
}

/// Reads thin_dump's XML. Errors give the line and what is wrong.
pub fn parse_xml(text: &str) -> Result<XmlSuperblock, String> {
    let tags = parse_tags(text)?;
    let mut sb: Option<XmlSuperblock> = None;
    let mut dev: Option<XmlDevice> = None;
    for t in tags {
        match (t.name.as_str(), t.closing) {
            ("superblock", false) => {
                if sb.is_some() {
                    return Err(format!("line {}: a second <superblock>", t.line));
                }
                sb = Some(XmlSuperblock {
                    uuid: t.attrs.get("uuid").cloned().unwrap_or_default(),
                    time: t.num("time")?,
                    transaction: t.num("transaction")?,
                    flags: t.attrs.get("flags").map_or(Ok(0), |_| t.num("flags"))?,
                    version: t.attrs.get("version").map_or(Ok(2), |_| t.num("version"))?,
                    data_block_size: t.num("data_block_size")?,
                    nr_data_blocks: t.num("nr_data_blocks")?,
                    devices: Vec::new(),
                });
            }
            ("superblock", true) => {}
            ("device", false) => {
                if sb.is_none() || dev.is_some() {
                    return Err(format!("line {}: misplaced <device>", t.line));
                }
                let d = XmlDevice {
                    dev_id: t.num("dev_id")?,
                    mapped_blocks: t.num("mapped_blocks")?,
                    transaction: t.num("transaction")?,
                    creation_time: t.num("creation_time")?,
                    snap_time: t.num("snap_time")?,
                    mappings: Vec::new(),
                };
                if t.self_closing {
                    if let Some(s) = sb.as_mut() {
                        s.devices.push(d);
                    }
                } else {
                    dev = Some(d);
                }
            }
            ("device", true) => {
                let d = dev
                    .take()
                    .ok_or_else(|| format!("line {}: </device> without <device>", t.line))?;
                if let Some(s) = sb.as_mut() {
                    s.devices.push(d);
                }
            }
            ("single_mapping", false) => {
                let d = dev
                    .as_mut()
                    .ok_or_else(|| format!("line {}: mapping outside a <device>", t.line))?;
                d.mappings.push(XmlMapping {
                    origin: t.num("origin_block")?,
                    data: t.num("data_block")?,
                    time: t.num("time")?,
                });
            }
            ("range_mapping", false) => {
                let d = dev
                    .as_mut()
                    .ok_or_else(|| format!("line {}: mapping outside a <device>", t.line))?;
                let origin: u64 = t.num("origin_begin")?;
                let data: u64 = t.num("data_begin")?;
                let len: u64 = t.num("length")?;
                let time: u32 = t.num("time")?;
                if origin.checked_add(len).is_none() || data.checked_add(len).is_none() {
                    return Err(format!("line {}: range_mapping overflows", t.line));
                }
                for i in 0..len {
                    d.mappings.push(XmlMapping {
                        origin: origin + i,
                        data: data + i,
                        time,
                    });
                }
            }
            ("single_mapping" | "range_mapping", true) => {}
            (other, _) => return Err(format!("line {}: unknown element <{other}>", t.line)),
        }
    }
    if dev.is_some() {
        return Err("a <device> is not closed".into());
    }
    sb.ok_or_else(|| "no <superblock> element".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"<superblock uuid="" time="1" transaction="3" flags="0" version="2" data_block_size="128" nr_data_blocks="1000">
  <device dev_id="1" mapped_blocks="12" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="10" time="0"/>
    <single_mapping origin_block="20" data_block="30" time="0"/>
    <single_mapping origin_block="22" data_block="31" time="1"/>
  </device>
  <device dev_id="2" mapped_blocks="10" transaction="1" creation_time="1" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="10" time="0"/>
  </device>
</superblock>
"#;

    #[test]
    fn round_trips_thin_dump_output_byte_for_byte() {
        let sb = parse_xml(SAMPLE).unwrap();
        assert_eq!(sb.devices.len(), 2);
        assert_eq!(sb.devices[0].mappings.len(), 12);
        assert_eq!(
            sb.devices[0].mappings[11],
            XmlMapping {
                origin: 22,
                data: 31,
                time: 1
            }
        );
        assert_eq!(write_xml(&sb), SAMPLE);
    }

    #[test]
    fn errors_name_the_line() {
        let bad = SAMPLE.replace("origin_block=\"20\"", "origin_block=\"x\"");
        let e = parse_xml(&bad).unwrap_err();
        assert!(e.contains("line 4") && e.contains("origin_block"), "{e}");
        assert!(parse_xml("<superblock").is_err());
        assert!(parse_xml("").is_err());
        assert!(parse_xml("<bogus/>").is_err());
    }
}
