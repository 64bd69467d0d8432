//! `civgate.v1.GetCitizenResponse`, written by hand: a look-up's answer can carry the bytes the
//! directory sent, once `api::wire` has checked them.

use bytes::{Buf, BufMut, Bytes};
use prost::{
    DecodeError, Message,
    encoding::{DecodeContext, WireType},
};

use super::v1::Citizen;

/// `civgate.v1.GetCitizenResponse` (build.rs maps the proto type here): the generated fields,
/// and the whole encoding when the gateway already has it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GetCitizenResponse {
    pub citizen: Option<Citizen>,
    /// Names of the fields the purpose did not allow and that were left unset.
    pub withheld_fields: Vec<String>,
    /// When set, this is the message's encoding and the two fields above are not encoded.
    /// Only `api::wire::forward` sets it, from bytes it has checked. Never set by decoding.
    pub encoded: Option<Bytes>,
}

impl Message for GetCitizenResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if let Some(b) = &self.encoded {
            buf.put_slice(b);
            return;
        }
        if let Some(c) = &self.citizen {
            prost::encoding::message::encode(1, c, buf);
        }
        prost::encoding::string::encode_repeated(2, &self.withheld_fields, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => prost::encoding::message::merge(
                wire_type,
                self.citizen.get_or_insert_with(Citizen::default),
                buf,
                ctx,
            ),
            2 => prost::encoding::string::merge_repeated(
                wire_type,
                &mut self.withheld_fields,
                buf,
                ctx,
            ),
            _ => prost::encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        match &self.encoded {
            Some(b) => b.len(),
            None => {
                self.citizen
                    .as_ref()
                    .map_or(0, |c| prost::encoding::message::encoded_len(1, c))
                    + prost::encoding::string::encoded_len_repeated(2, &self.withheld_fields)
            }
        }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}
