//! Option haggling without I/O, for both sides.
//!
//! [`ServerNegotiation`] takes the client's options one at a time and produces
//! the reply bytes and what the connection does next ([`ServerStep`]);
//! [`ClientNegotiation`] produces the options a client sends for what it wants
//! ([`ClientWants`]) and consumes the server's replies. The async shells in
//! `server.rs` and `client.rs` only move bytes; a test drives one against the
//! other in memory.
//!
//! What the server offers: fixed newstyle with `NO_ZEROES`; `NBD_OPT_GO`/`INFO`
//! (with `NBD_INFO_NAME`, `DESCRIPTION`, `BLOCK_SIZE`); `NBD_OPT_LIST`;
//! `NBD_OPT_STRUCTURED_REPLY`; `NBD_OPT_EXTENDED_HEADERS`;
//! `NBD_OPT_LIST_META_CONTEXT`/`SET_META_CONTEXT` with `base:allocation` and one
//! `qemu:dirty-bitmap:NAME` per checkpoint; `NBD_OPT_STARTTLS` when TLS is
//! configured, in the spec's FORCEDTLS mode (every option but `STARTTLS` and
//! `ABORT` is refused with `NBD_REP_ERR_TLS_REQD` until TLS is up).

use super::proto::{
    self, ClientOption, HeaderStyle, Info, InfoRequest, MetaContextRequest, OptionHeader,
    OptionReply, OptionReplyHeader, ProtoError, ReplyStyle,
};

/// Options a client may send before it must choose an export or leave.
pub const OPTIONS_PER_CONNECTION_MAX: u32 = 256;
/// Metadata contexts one `NBD_OPT_SET_META_CONTEXT` may select.
pub const META_CONTEXTS_MAX: usize = 64;

/// A metadata context an export answers `NBD_CMD_BLOCK_STATUS` for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MetaContext {
    /// `base:allocation`: holes (`NBD_STATE_HOLE`) and zeroes (`NBD_STATE_ZERO`).
    Allocation,
    /// `qemu:dirty-bitmap:NAME`: blocks changed since checkpoint NAME (`NBD_STATE_DIRTY`).
    DirtyBitmap(String),
}

impl MetaContext {
    /// The context's name on the wire.
    pub fn name(&self) -> String {
        match self {
            MetaContext::Allocation => proto::CONTEXT_BASE_ALLOCATION.to_owned(),
            MetaContext::DirtyBitmap(n) => format!("{}{n}", proto::CONTEXT_DIRTY_BITMAP_PREFIX),
        }
    }

    /// The context a full name selects, if it names one of ours (`bitmaps` are the
    /// dirty bitmaps the export has).
    pub fn parse(name: &str, bitmaps: &[String]) -> Option<MetaContext> {
        if name == proto::CONTEXT_BASE_ALLOCATION {
            return Some(MetaContext::Allocation);
        }
        let leaf = name.strip_prefix(proto::CONTEXT_DIRTY_BITMAP_PREFIX)?;
        bitmaps
            .iter()
            .any(|b| b == leaf)
            .then(|| MetaContext::DirtyBitmap(leaf.to_owned()))
    }
}

/// What the negotiation needs to know about the export.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
    pub read_only: bool,
    pub block_size_min: u32,
    pub block_size_preferred: u32,
    pub max_payload_bytes: u32,
    /// Names of the dirty bitmaps clients may select (`qemu:dirty-bitmap:NAME`).
    pub dirty_bitmaps: Vec<String>,
}

impl ExportInfo {
    /// The empty name selects the default export, which is our only export.
    fn matches(&self, requested: &[u8]) -> bool {
        requested.is_empty() || requested == self.name.as_bytes()
    }

    /// Transmission flags for a session with (or without) structured replies.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = proto::TFLAG_HAS_FLAGS
            | proto::TFLAG_SEND_FLUSH
            | proto::TFLAG_SEND_CACHE
            // Every backend's flush is global (frontend::ExportBackend::flush): a
            // FLUSH covers the completed writes of every connection.
            | proto::TFLAG_CAN_MULTI_CONN;
        if self.read_only {
            flags |= proto::TFLAG_READ_ONLY;
        } else {
            flags |= proto::TFLAG_SEND_FUA
                | proto::TFLAG_SEND_TRIM
                | proto::TFLAG_SEND_WRITE_ZEROES
                // Requests with FAST_ZERO are served or refused at once with ENOTSUP,
                // as the spec allows (frontend::ExportBackend::fast_zeroes).
                | proto::TFLAG_SEND_FAST_ZERO;
        }
        if structured {
            // Every read is answered with exactly one content chunk, so DF is free.
            flags |= proto::TFLAG_SEND_DF;
        }
        flags
    }
}

/// Whether the export insists on TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS configured: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    Off,
    /// FORCEDTLS: nothing but `STARTTLS` and `ABORT` before TLS is up.
    Required,
}

/// What a successful negotiation agreed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub style: HeaderStyle,
    pub reply: ReplyStyle,
    /// Selected metadata contexts and their ids, in id order.
    pub contexts: Vec<(u32, MetaContext)>,
    pub transmission_flags: u16,
    pub tls: bool,
}

/// What the connection does after an option has been answered.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerStep {
    /// Keep negotiating.
    Continue,
    /// The `NBD_REP_ACK` to `NBD_OPT_STARTTLS` is in `out`: send it, run the TLS
    /// handshake, call [`ServerNegotiation::tls_started`], keep negotiating.
    StartTls,
    /// The reply is written; enter the transmission phase.
    Transmission(Negotiated),
    /// Send what is in `out` (possibly nothing) and close the connection.
    Close(&'static str),
}

/// The server side of option haggling for one connection.
#[derive(Debug)]
pub struct ServerNegotiation {
    export: ExportInfo,
    tls_mode: TlsMode,
    tls_active: bool,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    contexts: Vec<(u32, MetaContext)>,
    next_context_id: u32,
    options_seen: u32,
}

impl ServerNegotiation {
    pub fn new(export: ExportInfo, tls_mode: TlsMode) -> ServerNegotiation {
        ServerNegotiation {
            export,
            tls_mode,
            tls_active: false,
            no_zeroes: false,
            structured: false,
            extended: false,
            contexts: Vec::new(),
            next_context_id: 1,
            options_seen: 0,
        }
    }

    /// The greeting the server sends first.
    pub fn greeting(&self) -> [u8; proto::GREETING_LEN] {
        proto::encode_greeting(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES)
    }

    /// The client's 4-byte flags; an unknown bit means the connection must close.
    pub fn client_flags(&mut self, flags: u32) -> Result<(), String> {
        let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
        if flags & !known != 0 {
            return Err(format!("client flags {flags:#x} include unknown bits"));
        }
        self.no_zeroes = flags & proto::FLAG_C_NO_ZEROES != 0;
        Ok(())
    }

    /// TLS is up: per the spec, nothing negotiated before it survives.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured = false;
        self.extended = false;
        self.contexts.clear();
    }

    /// Whether a client may send this many more options.
    fn count_option(&mut self) -> bool {
        self.options_seen += 1;
        self.options_seen <= OPTIONS_PER_CONNECTION_MAX
    }

    /// Answer an option whose data was too large to read (it was skipped).
    pub fn oversized_option(&mut self, header: OptionHeader, out: &mut Vec<u8>) -> ServerStep {
        if !self.count_option() {
            return ServerStep::Close("too many options without choosing an export");
        }
        if header.option == proto::OPT_EXPORT_NAME {
            return ServerStep::Close("NBD_OPT_EXPORT_NAME with an oversized name");
        }
        let msg = format!(
            "option data of {} bytes exceeds this server's limit of {} bytes",
            header.len,
            proto::OPTION_DATA_MAX_BYTES
        );
        proto::encode_option_error(out, header.option, proto::REP_ERR_TOO_BIG, &msg);
        ServerStep::Continue
    }

    /// Answer one option. `data` is its whole payload, at most
    /// [`proto::OPTION_DATA_MAX_BYTES`] long. Reply bytes are appended to `out`.
    pub fn option(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> ServerStep {
        if !self.count_option() {
            return ServerStep::Close("too many options without choosing an export");
        }
        let error = |out: &mut Vec<u8>, reply_type, msg: &str| {
            proto::encode_option_error(out, option, reply_type, msg);
            ServerStep::Continue
        };
        let decoded = match proto::decode_option(option, data) {
            Ok(o) => o,
            Err(e) if option == proto::OPT_EXPORT_NAME => {
                // EXPORT_NAME cannot be answered with an error.
                let _ = e;
                return ServerStep::Close("malformed NBD_OPT_EXPORT_NAME");
            }
            Err(e) => return error(out, proto::REP_ERR_INVALID, &e.to_string()),
        };
        if self.tls_mode == TlsMode::Required && !self.tls_active {
            match decoded {
                ClientOption::StartTls | ClientOption::Abort => {}
                ClientOption::ExportName(_) => {
                    return ServerStep::Close(
                        "NBD_OPT_EXPORT_NAME before TLS on an export that requires TLS",
                    );
                }
                _ => {
                    return error(
                        out,
                        proto::REP_ERR_TLS_REQD,
                        "this export requires TLS: send NBD_OPT_STARTTLS first",
                    );
                }
            }
        }
        match decoded {
            ClientOption::ExportName(name) => {
                if self.extended {
                    return ServerStep::Close(
                        "NBD_OPT_EXPORT_NAME after extended headers were negotiated",
                    );
                }
                if !self.export.matches(name) {
                    // The spec gives EXPORT_NAME no way to report an error.
                    return ServerStep::Close("NBD_OPT_EXPORT_NAME named an unknown export");
                }
                let flags = self.export.transmission_flags(self.structured);
                proto::encode_export_name_reply(out, self.export.size_bytes, flags, self.no_zeroes);
                ServerStep::Transmission(self.negotiated(flags))
            }
            ClientOption::Abort => {
                proto::encode_option_reply(out, option, &OptionReply::Ack);
                ServerStep::Close("client sent NBD_OPT_ABORT")
            }
            ClientOption::List => {
                proto::encode_option_reply(
                    out,
                    option,
                    &OptionReply::Server {
                        name: self.export.name.as_bytes(),
                        description: self.export.description.as_bytes(),
                    },
                );
                proto::encode_option_reply(out, option, &OptionReply::Ack);
                ServerStep::Continue
            }
            ClientOption::StartTls => match (self.tls_mode, self.tls_active) {
                (TlsMode::Off, _) => error(
                    out,
                    proto::REP_ERR_POLICY,
                    "TLS is not configured on this export (see --nbd-tls-client)",
                ),
                (TlsMode::Required, true) => {
                    error(out, proto::REP_ERR_INVALID, "TLS is already active")
                }
                (TlsMode::Required, false) => {
                    proto::encode_option_reply(out, option, &OptionReply::Ack);
                    ServerStep::StartTls
                }
            },
            ClientOption::Info(r) | ClientOption::Go(r) => self.info_or_go(option, &r, out),
            ClientOption::StructuredReply => {
                if self.extended {
                    return error(
                        out,
                        proto::REP_ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated; they include structured replies",
                    );
                }
                self.structured = true;
                proto::encode_option_reply(out, option, &OptionReply::Ack);
                ServerStep::Continue
            }
            ClientOption::ExtendedHeaders => {
                self.extended = true;
                self.structured = true;
                proto::encode_option_reply(out, option, &OptionReply::Ack);
                ServerStep::Continue
            }
            ClientOption::ListMetaContext(r) => self.list_meta_context(option, &r, out),
            ClientOption::SetMetaContext(r) => self.set_meta_context(option, &r, out),
            ClientOption::Unknown(_) => error(
                out,
                proto::REP_ERR_UNSUP,
                "option not supported by this server",
            ),
        }
    }

    fn negotiated(&self, transmission_flags: u16) -> Negotiated {
        Negotiated {
            style: if self.extended {
                HeaderStyle::Extended
            } else {
                HeaderStyle::Compact
            },
            reply: if self.extended {
                ReplyStyle::Extended
            } else if self.structured {
                ReplyStyle::Structured
            } else {
                ReplyStyle::Simple
            },
            contexts: self.contexts.clone(),
            transmission_flags,
            tls: self.tls_active,
        }
    }

    fn unknown_export(&self, option: u32, name: &[u8], out: &mut Vec<u8>) -> ServerStep {
        let shown = String::from_utf8_lossy(&name[..name.len().min(256)]);
        let msg = format!(
            "no export named '{shown}'; this server exports '{}' (or use the empty name)",
            self.export.name
        );
        proto::encode_option_error(out, option, proto::REP_ERR_UNKNOWN, &msg);
        ServerStep::Continue
    }

    fn info_or_go(&mut self, option: u32, r: &InfoRequest<'_>, out: &mut Vec<u8>) -> ServerStep {
        if !self.export.matches(r.name) {
            return self.unknown_export(option, r.name, out);
        }
        let flags = self.export.transmission_flags(self.structured);
        let info = |out: &mut Vec<u8>, info: Info<'_>| {
            proto::encode_option_reply(out, option, &OptionReply::Info(info));
        };
        info(
            out,
            Info::Export {
                size_bytes: self.export.size_bytes,
                flags,
            },
        );
        let (mut name, mut desc, mut block) = (false, false, false);
        for i in &r.infos {
            match *i {
                proto::INFO_NAME if !name => {
                    name = true;
                    info(out, Info::Name(self.export.name.as_bytes()));
                }
                proto::INFO_DESCRIPTION if !desc => {
                    desc = true;
                    info(out, Info::Description(self.export.description.as_bytes()));
                }
                proto::INFO_BLOCK_SIZE if !block => {
                    block = true;
                    info(
                        out,
                        Info::BlockSize {
                            minimum: self.export.block_size_min,
                            preferred: self.export.block_size_preferred,
                            maximum: self.export.max_payload_bytes,
                        },
                    );
                }
                // Duplicates, NBD_INFO_EXPORT (always sent) and unknown requests
                // are ignored, as the spec requires.
                _ => {}
            }
        }
        proto::encode_option_reply(out, option, &OptionReply::Ack);
        if option == proto::OPT_GO {
            ServerStep::Transmission(self.negotiated(flags))
        } else {
            ServerStep::Continue
        }
    }

    /// Contexts a `LIST_META_CONTEXT` query matches (wildcards allowed), or an
    /// error message for a malformed query.
    fn list_matches(&self, query: &str) -> Result<Vec<MetaContext>, &'static str> {
        let Some((namespace, leaf)) = query.split_once(':') else {
            return Err("a metadata context query must start with a namespace and a colon");
        };
        let bitmaps = || {
            self.export
                .dirty_bitmaps
                .iter()
                .map(|b| MetaContext::DirtyBitmap(b.clone()))
        };
        Ok(match (namespace, leaf) {
            ("base", "" | "allocation") => vec![MetaContext::Allocation],
            ("qemu", "" | "dirty-bitmap:") => bitmaps().collect(),
            ("qemu", leaf) => leaf
                .strip_prefix("dirty-bitmap:")
                .and_then(|name| {
                    MetaContext::parse(
                        &format!("qemu:dirty-bitmap:{name}"),
                        &self.export.dirty_bitmaps,
                    )
                })
                .into_iter()
                .collect(),
            // Unknown namespaces and leaves are ignored, as the spec requires.
            _ => Vec::new(),
        })
    }

    fn meta_precheck(
        &mut self,
        option: u32,
        r: &MetaContextRequest<'_>,
        out: &mut Vec<u8>,
    ) -> Option<ServerStep> {
        if !self.structured {
            proto::encode_option_error(
                out,
                option,
                proto::REP_ERR_INVALID,
                "negotiate NBD_OPT_STRUCTURED_REPLY or NBD_OPT_EXTENDED_HEADERS first",
            );
            return Some(ServerStep::Continue);
        }
        if !self.export.matches(r.name) {
            return Some(self.unknown_export(option, r.name, out));
        }
        None
    }

    fn list_meta_context(
        &mut self,
        option: u32,
        r: &MetaContextRequest<'_>,
        out: &mut Vec<u8>,
    ) -> ServerStep {
        if let Some(step) = self.meta_precheck(option, r, out) {
            return step;
        }
        let mut found: Vec<MetaContext> = Vec::new();
        if r.queries.is_empty() {
            found.push(MetaContext::Allocation);
            found.extend(
                self.export
                    .dirty_bitmaps
                    .iter()
                    .map(|b| MetaContext::DirtyBitmap(b.clone())),
            );
        } else {
            for q in &r.queries {
                match self.list_matches(q) {
                    Ok(m) => found.extend(m),
                    Err(msg) => {
                        proto::encode_option_error(out, option, proto::REP_ERR_INVALID, msg);
                        return ServerStep::Continue;
                    }
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for c in found {
            if seen.insert(c.clone()) {
                let name = c.name();
                // The spec: the id in a LIST reply is reserved and set to 0.
                proto::encode_option_reply(
                    out,
                    option,
                    &OptionReply::MetaContext { id: 0, name: &name },
                );
            }
        }
        proto::encode_option_reply(out, option, &OptionReply::Ack);
        ServerStep::Continue
    }

    fn set_meta_context(
        &mut self,
        option: u32,
        r: &MetaContextRequest<'_>,
        out: &mut Vec<u8>,
    ) -> ServerStep {
        // Replaces the selection, also when it fails.
        self.contexts.clear();
        if let Some(step) = self.meta_precheck(option, r, out) {
            return step;
        }
        let mut selected: Vec<MetaContext> = Vec::new();
        for q in &r.queries {
            if !q.contains(':') {
                proto::encode_option_error(
                    out,
                    option,
                    proto::REP_ERR_INVALID,
                    "a metadata context query must start with a namespace and a colon",
                );
                return ServerStep::Continue;
            }
            // Only exact names select; wildcards and unknown names are ignored.
            if let Some(c) = MetaContext::parse(q, &self.export.dirty_bitmaps)
                && !selected.contains(&c)
            {
                selected.push(c);
            }
        }
        if selected.len() > META_CONTEXTS_MAX {
            proto::encode_option_error(
                out,
                option,
                proto::REP_ERR_TOO_BIG,
                &format!("at most {META_CONTEXTS_MAX} metadata contexts per connection"),
            );
            return ServerStep::Continue;
        }
        for c in selected {
            let id = self.next_context_id;
            self.next_context_id = self.next_context_id.wrapping_add(1).max(1);
            let name = c.name();
            proto::encode_option_reply(out, option, &OptionReply::MetaContext { id, name: &name });
            self.contexts.push((id, c));
        }
        proto::encode_option_reply(out, option, &OptionReply::Ack);
        ServerStep::Continue
    }
}

// ---------------------------------------------------------------- client side

/// What a client asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientWants {
    pub export_name: String,
    /// Negotiate TLS first (`NBD_OPT_STARTTLS`); refuse to go on without it.
    pub tls: bool,
    /// Ask for structured replies (needed for block status).
    pub structured: bool,
    /// Ask for extended headers (64-bit lengths; implies structured replies).
    pub extended: bool,
    /// Metadata contexts to select (e.g. `base:allocation`).
    pub meta_contexts: Vec<String>,
}

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum_bytes: u32,
    pub preferred_bytes: u32,
    pub maximum_bytes: u32,
}

impl BlockSizes {
    /// The constraints the spec puts on advertised block sizes.
    pub fn validate(self) -> Result<(), &'static str> {
        let BlockSizes {
            minimum_bytes,
            preferred_bytes,
            maximum_bytes,
        } = self;
        if !minimum_bytes.is_power_of_two() || minimum_bytes > 64 * 1024 {
            return Err("minimum is not a power of two up to 64 KiB");
        }
        if !preferred_bytes.is_power_of_two() || preferred_bytes < minimum_bytes {
            return Err("preferred is not a power of two at least the minimum");
        }
        if maximum_bytes < minimum_bytes || !maximum_bytes.is_multiple_of(minimum_bytes) {
            return Err("maximum is not a multiple of the minimum");
        }
        Ok(())
    }
}

/// What the client learned and agreed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientNegotiated {
    pub size_bytes: u64,
    pub transmission_flags: u16,
    pub block_sizes: Option<BlockSizes>,
    pub style: HeaderStyle,
    pub reply: ReplyStyle,
    /// Selected metadata contexts: (id, name).
    pub contexts: Vec<(u32, String)>,
    pub tls: bool,
}

/// Why the client's negotiation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientNegotiationError {
    #[error("malformed message from the server: {0}")]
    Proto(#[from] ProtoError),
    #[error("the server is not fixed-newstyle, which {what} needs")]
    NotFixedNewstyle { what: &'static str },
    #[error("the server has no export named {export_name:?} ({message})")]
    ExportNotFound {
        export_name: String,
        message: String,
    },
    #[error("the server requires TLS ({message}); connect with TLS credentials")]
    TlsRequired { message: String },
    #[error("the server refused {option} with {reply} ({message})")]
    Refused {
        option: &'static str,
        reply: &'static str,
        message: String,
    },
    #[error("the server answered {got_option} while {expected} was pending")]
    WrongOption {
        expected: &'static str,
        got_option: u32,
    },
    #[error("unexpected {reply} in answer to {option}")]
    UnexpectedReply {
        option: &'static str,
        reply: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
}

/// What the client's shell does next.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientStep {
    /// Send these bytes, then read the next option reply and pass it to
    /// [`ClientNegotiation::reply`].
    Send(Vec<u8>),
    /// The server accepted `NBD_OPT_STARTTLS`: run the TLS handshake as a client
    /// now, then call [`ClientNegotiation::tls_started`].
    StartTls,
    /// Send these bytes (they end in `NBD_OPT_EXPORT_NAME`, for a server without
    /// `NBD_OPT_GO`), then read [`ClientNegotiation::export_name_reply_len`] bytes
    /// and pass them to [`ClientNegotiation::export_name_reply`].
    SendExportName(Vec<u8>),
    /// Negotiation is complete; enter the transmission phase.
    Done(ClientNegotiated),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    StartTls,
    ExtendedHeaders,
    StructuredReply,
    SetMetaContext,
    Go,
}

impl Pending {
    fn code(self) -> u32 {
        match self {
            Pending::StartTls => proto::OPT_STARTTLS,
            Pending::ExtendedHeaders => proto::OPT_EXTENDED_HEADERS,
            Pending::StructuredReply => proto::OPT_STRUCTURED_REPLY,
            Pending::SetMetaContext => proto::OPT_SET_META_CONTEXT,
            Pending::Go => proto::OPT_GO,
        }
    }
}

/// The client side of option haggling: STARTTLS (if wanted), then extended
/// headers, structured replies and metadata contexts (each if wanted, each
/// optional for the server), then `NBD_OPT_GO` with an `NBD_INFO_BLOCK_SIZE`
/// request, falling back to `NBD_OPT_EXPORT_NAME` for servers without `GO`.
#[derive(Debug)]
pub struct ClientNegotiation {
    wants: ClientWants,
    no_zeroes: bool,
    pending: Option<Pending>,
    tried_extended: bool,
    tried_structured: bool,
    tried_meta: bool,
    tls: bool,
    structured: bool,
    extended: bool,
    contexts: Vec<(u32, String)>,
    export: Option<(u64, u16)>,
    block_sizes: Option<BlockSizes>,
}

impl ClientNegotiation {
    /// Checks the export name and context names against the spec's string rules.
    pub fn new(wants: ClientWants) -> Result<ClientNegotiation, ClientNegotiationError> {
        if wants.export_name.len() > proto::STRING_MAX_BYTES || wants.export_name.contains('\0') {
            return Err(ClientNegotiationError::Invalid(format!(
                "export name of {} bytes: at most 4096 bytes, no NUL characters",
                wants.export_name.len()
            )));
        }
        if wants
            .meta_contexts
            .iter()
            .any(|q| q.len() > proto::STRING_MAX_BYTES || !q.contains(':'))
        {
            return Err(ClientNegotiationError::Invalid(
                "metadata context names are NAMESPACE:LEAF, at most 4096 bytes".into(),
            ));
        }
        Ok(ClientNegotiation {
            wants,
            no_zeroes: false,
            pending: None,
            tried_extended: false,
            tried_structured: false,
            tried_meta: false,
            tls: false,
            structured: false,
            extended: false,
            contexts: Vec::new(),
            export: None,
            block_sizes: None,
        })
    }

    /// The server's greeting: the client flags and the first option to send.
    pub fn greeting(
        &mut self,
        b: &[u8; proto::GREETING_LEN],
    ) -> Result<ClientStep, ClientNegotiationError> {
        let flags = proto::decode_greeting(b)?;
        let fixed_newstyle = flags & proto::FLAG_FIXED_NEWSTYLE != 0;
        self.no_zeroes = flags & proto::FLAG_NO_ZEROES != 0;
        let mut client_flags = 0u32;
        if fixed_newstyle {
            client_flags |= proto::FLAG_C_FIXED_NEWSTYLE;
        }
        if self.no_zeroes {
            client_flags |= proto::FLAG_C_NO_ZEROES;
        }
        let out = client_flags.to_be_bytes().to_vec();
        if !fixed_newstyle {
            if self.wants.tls {
                return Err(ClientNegotiationError::NotFixedNewstyle { what: "TLS" });
            }
            return Ok(self.export_name(out));
        }
        Ok(self.next_option(out))
    }

    /// TLS is up: the next option to send (state from before TLS is gone).
    pub fn tls_started(&mut self) -> ClientStep {
        self.tls = true;
        self.next_option(Vec::new())
    }

    /// Bytes of the `NBD_OPT_EXPORT_NAME` reply to read.
    pub fn export_name_reply_len(&self) -> usize {
        if self.no_zeroes {
            10
        } else {
            10 + proto::EXPORT_NAME_ZEROES_LEN
        }
    }

    /// The `NBD_OPT_EXPORT_NAME` reply.
    pub fn export_name_reply(
        &mut self,
        b: &[u8],
    ) -> Result<ClientNegotiated, ClientNegotiationError> {
        let (size_bytes, flags) = proto::decode_export_name_reply(b)?;
        self.export = Some((size_bytes, flags));
        self.done()
    }

    /// Bytes of an `NBD_OPT_ABORT`, for a soft disconnect after a failure.
    pub fn abort_bytes() -> Vec<u8> {
        let mut out = Vec::new();
        proto::encode_option(&mut out, &ClientOption::Abort);
        out
    }

    fn export_name(&mut self, mut out: Vec<u8>) -> ClientStep {
        self.pending = None;
        proto::encode_option(
            &mut out,
            &ClientOption::ExportName(self.wants.export_name.as_bytes()),
        );
        // Structured replies and contexts do not survive a fallback to a server
        // that lacks NBD_OPT_GO; the spec leaves them unusable with EXPORT_NAME
        // only if the server ignored them, so keep what was acknowledged.
        ClientStep::SendExportName(out)
    }

    fn next_option(&mut self, mut out: Vec<u8>) -> ClientStep {
        let (pending, option) = if self.wants.tls && !self.tls {
            (Pending::StartTls, ClientOption::StartTls)
        } else if self.wants.extended && !self.tried_extended {
            self.tried_extended = true;
            (Pending::ExtendedHeaders, ClientOption::ExtendedHeaders)
        } else if (self.wants.structured || !self.wants.meta_contexts.is_empty())
            && !self.structured
            && !self.tried_structured
        {
            self.tried_structured = true;
            (Pending::StructuredReply, ClientOption::StructuredReply)
        } else if !self.wants.meta_contexts.is_empty() && self.structured && !self.tried_meta {
            self.tried_meta = true;
            let queries = self
                .wants
                .meta_contexts
                .iter()
                .map(String::as_str)
                .collect();
            (
                Pending::SetMetaContext,
                ClientOption::SetMetaContext(MetaContextRequest {
                    name: self.wants.export_name.as_bytes(),
                    queries,
                }),
            )
        } else {
            (
                Pending::Go,
                ClientOption::Go(InfoRequest {
                    name: self.wants.export_name.as_bytes(),
                    infos: vec![proto::INFO_BLOCK_SIZE],
                }),
            )
        };
        proto::encode_option(&mut out, &option);
        self.pending = Some(pending);
        ClientStep::Send(out)
    }

    fn done(&mut self) -> Result<ClientNegotiated, ClientNegotiationError> {
        let Some((size_bytes, transmission_flags)) = self.export else {
            return Err(ClientNegotiationError::Invalid(
                "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into(),
            ));
        };
        Ok(ClientNegotiated {
            size_bytes,
            transmission_flags,
            block_sizes: self.block_sizes,
            style: if self.extended {
                HeaderStyle::Extended
            } else {
                HeaderStyle::Compact
            },
            reply: if self.extended {
                ReplyStyle::Extended
            } else if self.structured {
                ReplyStyle::Structured
            } else {
                ReplyStyle::Simple
            },
            contexts: self.contexts.clone(),
            tls: self.tls,
        })
    }

    /// One option reply (header and its data).
    pub fn reply(
        &mut self,
        header: OptionReplyHeader,
        data: &[u8],
    ) -> Result<ClientStep, ClientNegotiationError> {
        let Some(pending) = self.pending else {
            return Err(ClientNegotiationError::Invalid(
                "an option reply while no option is pending".into(),
            ));
        };
        let option = proto::option_name(pending.code());
        if header.option != pending.code() {
            return Err(ClientNegotiationError::WrongOption {
                expected: option,
                got_option: header.option,
            });
        }
        let reply = proto::decode_option_reply(header.reply_type, data)?;
        let unexpected = |reply: &OptionReply<'_>| ClientNegotiationError::UnexpectedReply {
            option,
            reply: proto::option_reply_name(reply.reply_type()),
        };
        if let OptionReply::Error {
            reply_type,
            message,
        } = &reply
        {
            let message = server_message(message);
            if *reply_type == proto::REP_ERR_TLS_REQD && !self.tls {
                return Err(ClientNegotiationError::TlsRequired { message });
            }
            return match pending {
                // Optional features: go on without them.
                Pending::ExtendedHeaders | Pending::StructuredReply => {
                    Ok(self.next_option(Vec::new()))
                }
                Pending::SetMetaContext => {
                    self.contexts.clear();
                    Ok(self.next_option(Vec::new()))
                }
                Pending::Go if *reply_type == proto::REP_ERR_UNSUP && !self.extended => {
                    Ok(self.export_name(Vec::new()))
                }
                Pending::Go if *reply_type == proto::REP_ERR_UNKNOWN => {
                    Err(ClientNegotiationError::ExportNotFound {
                        export_name: self.wants.export_name.clone(),
                        message,
                    })
                }
                _ => Err(ClientNegotiationError::Refused {
                    option,
                    reply: proto::option_reply_name(*reply_type),
                    message,
                }),
            };
        }
        match (pending, &reply) {
            (Pending::StartTls, OptionReply::Ack) => {
                self.pending = None;
                Ok(ClientStep::StartTls)
            }
            (Pending::ExtendedHeaders, OptionReply::Ack) => {
                self.extended = true;
                self.structured = true;
                Ok(self.next_option(Vec::new()))
            }
            (Pending::StructuredReply, OptionReply::Ack) => {
                self.structured = true;
                Ok(self.next_option(Vec::new()))
            }
            (Pending::SetMetaContext, OptionReply::MetaContext { id, name }) => {
                if !self.wants.meta_contexts.iter().any(|q| q == name) {
                    return Err(ClientNegotiationError::Invalid(format!(
                        "the server selected metadata context {name:?}, which was not asked for"
                    )));
                }
                if self.contexts.iter().any(|(i, _)| i == id) {
                    return Err(ClientNegotiationError::Invalid(format!(
                        "the server gave metadata context id {id} twice"
                    )));
                }
                self.contexts.push((*id, (*name).to_owned()));
                Ok(ClientStep::Send(Vec::new()))
            }
            (Pending::SetMetaContext, OptionReply::Ack) => Ok(self.next_option(Vec::new())),
            (Pending::Go, OptionReply::Info(info)) => {
                match info {
                    Info::Export { size_bytes, flags } => self.export = Some((*size_bytes, *flags)),
                    Info::BlockSize {
                        minimum,
                        preferred,
                        maximum,
                    } => {
                        let sizes = BlockSizes {
                            minimum_bytes: *minimum,
                            preferred_bytes: *preferred,
                            maximum_bytes: *maximum,
                        };
                        sizes.validate().map_err(|reason| {
                            ClientNegotiationError::Invalid(format!(
                                "NBD_INFO_BLOCK_SIZE {sizes:?}: {reason}"
                            ))
                        })?;
                        self.block_sizes = Some(sizes);
                    }
                    // NAME, DESCRIPTION and future info types are not needed.
                    _ => {}
                }
                Ok(ClientStep::Send(Vec::new()))
            }
            (Pending::Go, OptionReply::Ack) => {
                self.pending = None;
                self.done().map(ClientStep::Done)
            }
            (_, reply) => Err(unexpected(reply)),
        }
    }
}

/// A server's error message, lossily decoded and cut for display.
pub fn server_message(payload: &[u8]) -> String {
    if payload.is_empty() {
        return "no message".to_string();
    }
    String::from_utf8_lossy(&payload[..payload.len().min(512)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn export() -> ExportInfo {
        ExportInfo {
            name: "vol0".into(),
            description: "test volume".into(),
            size_bytes: 1 << 20,
            read_only: false,
            block_size_min: 512,
            block_size_preferred: 4096,
            max_payload_bytes: 1 << 16,
            dirty_bitmaps: vec!["daily".into(), "weekly".into()],
        }
    }

    /// Split a stream of option replies into (option, reply type, data).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            let h = proto::decode_option_reply_header(out[..20].try_into().unwrap()).unwrap();
            let len = h.len as usize;
            v.push((h.option, h.reply_type, out[20..20 + len].to_vec()));
            out = &out[20 + len..];
        }
        v
    }

    fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        proto::encode_option(
            &mut out,
            &ClientOption::Go(InfoRequest {
                name,
                infos: infos.to_vec(),
            }),
        );
        out.split_off(proto::OPTION_HEADER_LEN)
    }

    fn meta_data(queries: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        proto::encode_option(
            &mut out,
            &ClientOption::SetMetaContext(MetaContextRequest {
                name: b"",
                queries: queries.to_vec(),
            }),
        );
        out.split_off(proto::OPTION_HEADER_LEN)
    }

    fn ask(
        n: &mut ServerNegotiation,
        option: u32,
        data: &[u8],
    ) -> (ServerStep, Vec<(u32, u32, Vec<u8>)>) {
        let mut out = Vec::new();
        let step = n.option(option, data, &mut out);
        let parsed = if option == proto::OPT_EXPORT_NAME {
            Vec::new()
        } else {
            replies(&out)
        };
        (step, parsed)
    }

    #[test]
    fn go_with_all_info_requests_answers_each_once_then_ack() {
        let mut n = ServerNegotiation::new(export(), TlsMode::Off);
        let data = info_data(
            b"vol0",
            &[
                proto::INFO_BLOCK_SIZE,
                proto::INFO_NAME,
                proto::INFO_DESCRIPTION,
                proto::INFO_NAME,
                999,
            ],
        );
        let (step, r) = ask(&mut n, proto::OPT_GO, &data);
        assert!(matches!(step, ServerStep::Transmission(_)));
        let types: Vec<u16> = r
            .iter()
            .filter(|x| x.1 == proto::REP_INFO)
            .map(|x| u16::from_be_bytes([x.2[0], x.2[1]]))
            .collect();
        assert_eq!(
            types,
            vec![
                proto::INFO_EXPORT,
                proto::INFO_BLOCK_SIZE,
                proto::INFO_NAME,
                proto::INFO_DESCRIPTION
            ]
        );
        assert_eq!(r[0].2[2..10], (1u64 << 20).to_be_bytes());
        assert_eq!(r[1].2[2..], [0, 0, 2, 0, 0, 0, 16, 0, 0, 1, 0, 0]);
        assert_eq!(&r[2].2[2..], b"vol0");
        assert_eq!(r.last().unwrap().1, proto::REP_ACK);
    }

    #[test]
    fn info_continues_and_unknown_exports_are_err_unknown() {
        let mut n = ServerNegotiation::new(export(), TlsMode::Off);
        let (step, r) = ask(&mut n, proto::OPT_INFO, &info_data(b"", &[]));
        assert_eq!(step, ServerStep::Continue);
        assert_eq!((r[0].1, r[1].1), (proto::REP_INFO, proto::REP_ACK));
        let (step, r) = ask(&mut n, proto::OPT_GO, &info_data(b"nope", &[]));
        assert_eq!(step, ServerStep::Continue);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1, proto::REP_ERR_UNKNOWN);
        assert!(String::from_utf8_lossy(&r[0].2).contains("nope"));
    }

    #[test]
    fn malformed_options_are_err_invalid_and_negotiation_continues() {
        let mut n = ServerNegotiation::new(export(), TlsMode::Off);
        for (option, data) in [
            (proto::OPT_GO, vec![0u8, 0, 0]),
            (proto::OPT_INFO, vec![0xff, 0xff, 0xff, 0xff, 0, 0]),
            (proto::OPT_LIST, vec![1]),
            (proto::OPT_STRUCTURED_REPLY, vec![1]),
            (
                proto::OPT_SET_META_CONTEXT,
                vec![0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
            ),
        ] {
            let (step, r) = ask(&mut n, option, &data);
            assert_eq!(step, ServerStep::Continue);
            assert_eq!(r.len(), 1);
            assert_eq!(
                r[0].1,
                proto::REP_ERR_INVALID,
                "{}",
                proto::option_name(option)
            );
        }
        // Still usable afterwards.
        let (step, _) = ask(&mut n, proto::OPT_GO, &info_data(b"", &[]));
        assert!(matches!(step, ServerStep::Transmission(_)));
    }

    #[test]
    fn export_name_honours_no_zeroes_and_cannot_report_errors() {
        for (flags, len) in [(3u32, 10usize), (1, 134)] {
            let mut n = ServerNegotiation::new(export(), TlsMode::Off);
            n.client_flags(flags).unwrap();
            let mut out = Vec::new();
            let step = n.option(proto::OPT_EXPORT_NAME, b"vol0", &mut out);
            assert!(matches!(step, ServerStep::Transmission(_)));
            assert_eq!(out.len(), len);
        }
        let mut n = ServerNegotiation::new(export(), TlsMode::Off);
        let mut out = Vec::new();
        assert!(matches!(
            n.option(proto::OPT_EXPORT_NAME, b"other", &mut out),
            ServerStep::Close(_)
        ));
        assert!(out.is_empty());
        assert!(n.client_flags(1 << 5).is_err());
    }

    #[test]
    fn list_names_the_export_and_abort_acks_then_closes() {
        let mut n = ServerNegotiation::new(export(), TlsMode::Off);
        let (_, r) = ask(&mut n, proto::OPT_LIST, &[]);
        assert_eq!(r[0].1, proto::REP_SERVER);
        assert_eq!(&r[0].2[..8], b"\0\0\0\x04vol0");
        assert_eq!(&r[0].2[8..], b"test volume");
        assert_eq!(r[1].1, proto::REP_ACK);
        let (step, r) = ask(&mut n, proto::OPT_ABORT, &[]);
        assert!(matches!(step, ServerStep::Close(_)));
        assert_eq!(r[0].1, proto::REP_ACK);
    }

    #[test]
    fn unknown_options_get_err_unsup_and_starttls_without_tls_err_policy() {
        let mut n = ServerNegotiation::new(export(), TlsMode::Off);
        for opt in [4, 12, 12345, u32::MAX] {
            let (step, r) = ask(&mut n, opt, &[1, 2, 3]);
            assert_eq!(step, ServerStep::Continue);
            assert_eq!((r[0].0, r[0].1), (opt, proto::REP_ERR_UNSUP));
        }
        let (_, r) = ask(&mut n, proto::OPT_STARTTLS, &[]);
        assert_eq!(r[0].1, proto::REP_ERR_POLICY);
    }

    #[test]
    fn forced_tls_refuses_everything_before_starttls_and_forgets_state_after() {
        let mut n = ServerNegotiation::new(export(), TlsMode::Required);
        for (option, data) in [
            (proto::OPT_GO, info_data(b"", &[])),
            (proto::OPT_INFO, info_data(b"", &[])),
            (proto::OPT_LIST, vec![]),
            (proto::OPT_STRUCTURED_REPLY, vec![]),
            (proto::OPT_SET_META_CONTEXT, meta_data(&["base:allocation"])),
            (99, vec![]),
        ] {
            let (step, r) = ask(&mut n, option, &data);
            assert_eq!(step, ServerStep::Continue);
            assert_eq!(
                r[0].1,
                proto::REP_ERR_TLS_REQD,
                "{}",
                proto::option_name(option)
            );
        }
        let mut out = Vec::new();
        assert!(matches!(
            n.option(proto::OPT_EXPORT_NAME, b"", &mut out),
            ServerStep::Close(_)
        ));
        let mut n = ServerNegotiation::new(export(), TlsMode::Required);
        let (step, r) = ask(&mut n, proto::OPT_STARTTLS, &[1]);
        assert_eq!(
            (step, r[0].1),
            (ServerStep::Continue, proto::REP_ERR_INVALID)
        );
        let (step, r) = ask(&mut n, proto::OPT_STARTTLS, &[]);
        assert_eq!((step, r[0].1), (ServerStep::StartTls, proto::REP_ACK));
        n.tls_started();
        let (step, r) = ask(&mut n, proto::OPT_STARTTLS, &[]);
        assert_eq!(
            (step, r[0].1),
            (ServerStep::Continue, proto::REP_ERR_INVALID)
        );
        ask(&mut n, proto::OPT_STRUCTURED_REPLY, &[]);
        ask(
            &mut n,
            proto::OPT_SET_META_CONTEXT,
            &meta_data(&["base:allocation"]),
        );
        let (step, _) = ask(&mut n, proto::OPT_GO, &info_data(b"", &[]));
        let ServerStep::Transmission(t) = step else {
            panic!("{step:?}")
        };
        assert!(t.tls);
        assert_eq!(t.reply, ReplyStyle::Structured);
        assert_eq!(t.contexts.len(), 1);
        // State from before STARTTLS does not survive it.
        let mut n = ServerNegotiation::new(export(), TlsMode::Off);
        ask(&mut n, proto::OPT_STRUCTURED_REPLY, &[]);
        n.tls_started();
        let (_, r) = ask(
            &mut n,
            proto::OPT_SET_META_CONTEXT,
            &meta_data(&["base:allocation"]),
        );
        assert_eq!(r[0].1, proto::REP_ERR_INVALID);
    }

    #[test]
    fn meta_contexts_need_structured_replies_and_select_exact_names_only() {
        let mut n = ServerNegotiation::new(export(), TlsMode::Off);
        let (_, r) = ask(
            &mut n,
            proto::OPT_SET_META_CONTEXT,
            &meta_data(&["base:allocation"]),
        );
        assert_eq!(r[0].1, proto::REP_ERR_INVALID);
        ask(&mut n, proto::OPT_STRUCTURED_REPLY, &[]);
        let (_, r) = ask(
            &mut n,
            proto::OPT_SET_META_CONTEXT,
            &meta_data(&[
                "base:allocation",
                "base:",
                "qemu:dirty-bitmap:",
                "qemu:dirty-bitmap:weekly",
                "qemu:dirty-bitmap:nope",
                "x-other:thing",
                "base:allocation",
            ]),
        );
        let names: Vec<String> = r
            .iter()
            .filter(|x| x.1 == proto::REP_META_CONTEXT)
            .map(|x| String::from_utf8(x.2[4..].to_vec()).unwrap())
            .collect();
        assert_eq!(names, ["base:allocation", "qemu:dirty-bitmap:weekly"]);
        let ids: Vec<u32> = r
            .iter()
            .filter(|x| x.1 == proto::REP_META_CONTEXT)
            .map(|x| u32::from_be_bytes(x.2[..4].try_into().unwrap()))
            .collect();
        assert_ne!(ids[0], ids[1]);
        assert_eq!(r.last().unwrap().1, proto::REP_ACK);
        // A query without a namespace is invalid and clears the selection.
        let (_, r) = ask(
            &mut n,
            proto::OPT_SET_META_CONTEXT,
            &meta_data(&["allocation"]),
        );
        assert_eq!(r[0].1, proto::REP_ERR_INVALID);
        let (step, _) = ask(&mut n, proto::OPT_GO, &info_data(b"", &[]));
        let ServerStep::Transmission(t) = step else {
            panic!()
        };
        assert!(t.contexts.is_empty());
        assert_ne!(t.transmission_flags & proto::TFLAG_SEND_DF, 0);
    }

    #[test]
    fn list_meta_context_expands_wildcards() {
        let mut n = ServerNegotiation::new(export(), TlsMode::Off);
        ask(&mut n, proto::OPT_STRUCTURED_REPLY, &[]);
        let list = |n: &mut ServerNegotiation, q: &[&str]| {
            let mut data = meta_data(q);
            let _ = &mut data;
            let (_, r) = ask(n, proto::OPT_LIST_META_CONTEXT, &data);
            r.iter()
                .filter(|x| x.1 == proto::REP_META_CONTEXT)
                .map(|x| {
                    assert_eq!(&x.2[..4], &[0, 0, 0, 0]);
                    String::from_utf8(x.2[4..].to_vec()).unwrap()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            list(&mut n, &[]),
            [
                "base:allocation",
                "qemu:dirty-bitmap:daily",
                "qemu:dirty-bitmap:weekly"
            ]
        );
        assert_eq!(list(&mut n, &["base:"]), ["base:allocation"]);
        assert_eq!(
            list(&mut n, &["qemu:dirty-bitmap:", "qemu:"]),
            ["qemu:dirty-bitmap:daily", "qemu:dirty-bitmap:weekly"]
        );
        assert_eq!(
            list(&mut n, &["qemu:dirty-bitmap:daily", "zzz:"]),
            ["qemu:dirty-bitmap:daily"]
        );
        assert!(list(&mut n, &["qemu:dirty-bitmap:nope"]).is_empty());
    }

    #[test]
    fn extended_headers_supersede_structured_replies_and_forbid_export_name() {
        let mut n = ServerNegotiation::new(export(), TlsMode::Off);
        ask(&mut n, proto::OPT_EXTENDED_HEADERS, &[]);
        let (_, r) = ask(&mut n, proto::OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(r[0].1, proto::REP_ERR_EXT_HEADER_REQD);
        let mut out = Vec::new();
        assert!(matches!(
            n.option(proto::OPT_EXPORT_NAME, b"", &mut out),
            ServerStep::Close(_)
        ));
        let (step, _) = ask(&mut n, proto::OPT_GO, &info_data(b"", &[]));
        let ServerStep::Transmission(t) = step else {
            panic!()
        };
        assert_eq!(
            (t.style, t.reply),
            (HeaderStyle::Extended, ReplyStyle::Extended)
        );
    }

    #[test]
    fn read_only_exports_advertise_no_write_features() {
        let ro = ExportInfo {
            read_only: true,
            ..export()
        };
        let f = ro.transmission_flags(false);
        assert_ne!(f & proto::TFLAG_READ_ONLY, 0);
        assert_ne!(f & proto::TFLAG_CAN_MULTI_CONN, 0);
        assert_ne!(f & proto::TFLAG_SEND_CACHE, 0);
        assert_eq!(
            f & (proto::TFLAG_SEND_TRIM
                | proto::TFLAG_SEND_WRITE_ZEROES
                | proto::TFLAG_SEND_FAST_ZERO),
            0
        );
        let rw = export().transmission_flags(false);
        assert_eq!(rw & proto::TFLAG_READ_ONLY, 0);
        assert_ne!(rw & proto::TFLAG_SEND_FAST_ZERO, 0);
        assert_eq!(rw & proto::TFLAG_SEND_DF, 0);
    }

    #[test]
    fn too_many_options_close_the_connection() {
        let mut n = ServerNegotiation::new(export(), TlsMode::Off);
        for _ in 0..OPTIONS_PER_CONNECTION_MAX {
            assert_eq!(ask(&mut n, proto::OPT_LIST, &[]).0, ServerStep::Continue);
        }
        assert!(matches!(
            ask(&mut n, proto::OPT_LIST, &[]).0,
            ServerStep::Close(_)
        ));
    }

    /// Drive a client negotiation against a server negotiation in memory.
    fn drive(
        wants: ClientWants,
        server_export: ExportInfo,
        tls: TlsMode,
    ) -> Result<(ClientNegotiated, Option<Negotiated>), ClientNegotiationError> {
        let mut server = ServerNegotiation::new(server_export, tls);
        let mut client = ClientNegotiation::new(wants)?;
        let mut step = client.greeting(&server.greeting())?;
        let mut first = true;
        let mut server_result = None;
        loop {
            step = match step {
                ClientStep::Send(mut bytes) | ClientStep::SendExportName(mut bytes) if first => {
                    first = false;
                    let flags = bytes.drain(..4).collect::<Vec<_>>();
                    server
                        .client_flags(u32::from_be_bytes(flags.try_into().unwrap()))
                        .unwrap();
                    ClientStep::Send(bytes)
                }
                ClientStep::Send(bytes) => {
                    let mut out = Vec::new();
                    if !bytes.is_empty() {
                        let h =
                            proto::decode_option_header(bytes[..16].try_into().unwrap()).unwrap();
                        assert_eq!(h.len as usize, bytes.len() - 16, "one option at a time");
                        match server.option(h.option, &bytes[16..], &mut out) {
                            ServerStep::Transmission(t) => server_result = Some(t),
                            ServerStep::StartTls => {}
                            other => assert_eq!(other, ServerStep::Continue),
                        }
                        // Replay the replies one by one to the client.
                        let mut rest = &out[..];
                        let mut last = None;
                        while !rest.is_empty() {
                            let h =
                                proto::decode_option_reply_header(rest[..20].try_into().unwrap())
                                    .unwrap();
                            let data = &rest[20..20 + h.len as usize];
                            rest = &rest[20 + h.len as usize..];
                            last = Some(client.reply(h, data)?);
                            if !rest.is_empty() {
                                assert_eq!(last, Some(ClientStep::Send(Vec::new())));
                            }
                        }
                        last.expect("the server answered")
                    } else {
                        unreachable!("an empty send is only returned mid-reply")
                    }
                }
                ClientStep::StartTls => {
                    server.tls_started();
                    client.tls_started()
                }
                ClientStep::SendExportName(_) => unreachable!("the server knows NBD_OPT_GO"),
                ClientStep::Done(n) => return Ok((n, server_result)),
            };
        }
    }

    proptest! {
        #[test]
        fn client_and_server_agree_on_what_they_negotiated(
            structured in any::<bool>(),
            extended in any::<bool>(),
            tls in any::<bool>(),
            read_only in any::<bool>(),
            contexts in proptest::collection::vec(prop_oneof![
                Just("base:allocation".to_string()),
                Just("qemu:dirty-bitmap:daily".to_string()),
                Just("qemu:dirty-bitmap:missing".to_string()),
                Just("x-foo:bar".to_string()),
            ], 0..4),
            export_name in prop_oneof![Just(String::new()), Just("vol0".to_string())],
        ) {
            let wants = ClientWants { export_name, tls, structured, extended, meta_contexts: contexts.clone() };
            let server_export = ExportInfo { read_only, ..export() };
            let mode = if tls { TlsMode::Required } else { TlsMode::Off };
            let (client, server) = drive(wants, server_export.clone(), mode).unwrap();
            let server = server.expect("the server entered transmission");
            prop_assert_eq!(client.style, server.style);
            prop_assert_eq!(client.reply, server.reply);
            prop_assert_eq!(client.transmission_flags, server.transmission_flags);
            prop_assert_eq!(client.tls, tls);
            prop_assert_eq!(server.tls, tls);
            prop_assert_eq!(client.size_bytes, server_export.size_bytes);
            prop_assert_eq!(client.reply != ReplyStyle::Simple, structured || extended || !contexts.is_empty());
            prop_assert_eq!(client.style == HeaderStyle::Extended, extended);
            let server_contexts: Vec<(u32, String)> = server.contexts.iter().map(|(i, c)| (*i, c.name())).collect();
            prop_assert_eq!(&client.contexts, &server_contexts);
            for (_, name) in &client.contexts {
                prop_assert!(contexts.contains(name));
                prop_assert!(!name.contains("missing") && !name.starts_with("x-"));
            }
            prop_assert_eq!(client.block_sizes.map(|b| b.maximum_bytes), Some(server_export.max_payload_bytes));
        }
    }

    #[test]
    fn a_client_wanting_tls_from_a_server_without_it_fails() {
        let wants = ClientWants {
            tls: true,
            ..ClientWants::default()
        };
        let e = drive(wants, export(), TlsMode::Off).unwrap_err();
        assert!(
            matches!(
                e,
                ClientNegotiationError::Refused {
                    reply: "NBD_REP_ERR_POLICY",
                    ..
                }
            ),
            "{e}"
        );
        let e = drive(ClientWants::default(), export(), TlsMode::Required).unwrap_err();
        assert!(
            matches!(e, ClientNegotiationError::TlsRequired { .. }),
            "{e}"
        );
    }
}
