//! What a declared purpose (legal basis) may be used for: which `Citizens` methods, by which
//! roles. A purpose is data in the config (`[purposes.X] methods`, `roles`); this is the one
//! decision, checked before the look-up does any work. `IDENTITY_VERIFICATION` bound to
//! `VerifyCitizen` cannot be turned into a look-up of name, date of birth and sex by calling
//! `GetCitizen` with it.

use std::fmt;

use civgate_domain::Role;
use serde::Deserialize;

/// A `civgate.v1.Citizens` method, as the config names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum CitizensMethod {
    GetCitizen,
    BatchGetCitizens,
    VerifyCitizen,
    SearchCitizens,
}

impl CitizensMethod {
    pub const ALL: [CitizensMethod; 4] = [
        CitizensMethod::GetCitizen,
        CitizensMethod::BatchGetCitizens,
        CitizensMethod::VerifyCitizen,
        CitizensMethod::SearchCitizens,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CitizensMethod::GetCitizen => "GetCitizen",
            CitizensMethod::BatchGetCitizens => "BatchGetCitizens",
            CitizensMethod::VerifyCitizen => "VerifyCitizen",
            CitizensMethod::SearchCitizens => "SearchCitizens",
        }
    }

    /// Whether the method releases field values (a verification releases match flags only).
    pub fn releases_values(self) -> bool {
        self != CitizensMethod::VerifyCitizen
    }
}

impl fmt::Display for CitizensMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The methods and roles one purpose is bound to.
#[derive(Clone, Copy, Debug)]
pub struct PurposeUse<'a> {
    pub methods: &'a [CitizensMethod],
    pub roles: &'a [Role],
}

/// Why a purpose may not be used for a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PurposeDenial {
    Method {
        purpose: String,
        method: CitizensMethod,
        allowed: Vec<CitizensMethod>,
    },
    Role {
        purpose: String,
        role: Role,
    },
}

impl fmt::Display for PurposeDenial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PurposeDenial::Method {
                purpose,
                method,
                allowed,
            } => {
                let allowed: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
                write!(
                    f,
                    "purpose {purpose} may not be used with {method}; it is for {}",
                    allowed.join(", ")
                )
            }
            PurposeDenial::Role { purpose, role } => {
                write!(f, "purpose {purpose} may not be declared by a {role}")
            }
        }
    }
}

impl PurposeDenial {
    /// The audit record's refusal reason.
    pub fn reason(&self) -> &'static str {
        match self {
            PurposeDenial::Method { .. } => "purpose_not_for_method",
            PurposeDenial::Role { .. } => "purpose_not_for_role",
        }
    }
}

/// May `role` declare `purpose` (bound as `binding`) for `method`?
pub fn purpose_permits(
    purpose: &str,
    binding: PurposeUse<'_>,
    method: CitizensMethod,
    role: Role,
) -> Result<(), PurposeDenial> {
    if !binding.roles.contains(&role) {
        return Err(PurposeDenial::Role {
            purpose: purpose.to_owned(),
            role,
        });
    }
    if !binding.methods.contains(&method) {
        return Err(PurposeDenial::Method {
            purpose: purpose.to_owned(),
            method,
            allowed: binding.methods.to_vec(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use CitizensMethod::*;
    use Role::*;

    #[test]
    fn a_purpose_is_used_only_with_its_methods_and_by_its_roles() {
        let verify_only = PurposeUse {
            methods: &[VerifyCitizen],
            roles: &[CivilRegistry],
        };
        let lookups = PurposeUse {
            methods: &[GetCitizen, BatchGetCitizens, VerifyCitizen],
            roles: &[CivilRegistry],
        };
        let insurance = PurposeUse {
            methods: &[GetCitizen],
            roles: &[PopulationDb],
        };
        // (binding, method, role, expected refusal reason or None)
        let rows: &[(PurposeUse, CitizensMethod, Role, Option<&str>)] = &[
            (verify_only, VerifyCitizen, CivilRegistry, None),
            (
                verify_only,
                GetCitizen,
                CivilRegistry,
                Some("purpose_not_for_method"),
            ),
            (
                verify_only,
                BatchGetCitizens,
                CivilRegistry,
                Some("purpose_not_for_method"),
            ),
            (
                verify_only,
                SearchCitizens,
                CivilRegistry,
                Some("purpose_not_for_method"),
            ),
            (
                verify_only,
                VerifyCitizen,
                Auditor,
                Some("purpose_not_for_role"),
            ),
            (lookups, GetCitizen, CivilRegistry, None),
            (lookups, BatchGetCitizens, CivilRegistry, None),
            (
                lookups,
                SearchCitizens,
                CivilRegistry,
                Some("purpose_not_for_method"),
            ),
            (
                lookups,
                GetCitizen,
                PopulationDb,
                Some("purpose_not_for_role"),
            ),
            (insurance, GetCitizen, PopulationDb, None),
            (
                insurance,
                GetCitizen,
                CivilRegistry,
                Some("purpose_not_for_role"),
            ),
            // The role is judged first: a wrong role learns nothing of the methods.
            (
                insurance,
                VerifyCitizen,
                CivilRegistry,
                Some("purpose_not_for_role"),
            ),
        ];
        for (i, (binding, method, role, want)) in rows.iter().enumerate() {
            let got = purpose_permits("P", *binding, *method, *role);
            assert_eq!(
                got.as_ref().err().map(PurposeDenial::reason),
                *want,
                "row {i}: {method} by {role}: {got:?}"
            );
        }
    }

    #[test]
    fn the_refusal_names_the_methods_the_purpose_is_for() {
        let e = purpose_permits(
            "IDENTITY_VERIFICATION",
            PurposeUse {
                methods: &[VerifyCitizen],
                roles: &[CivilRegistry],
            },
            GetCitizen,
            CivilRegistry,
        )
        .expect_err("refused");
        assert_eq!(
            e.to_string(),
            "purpose IDENTITY_VERIFICATION may not be used with GetCitizen; it is for VerifyCitizen"
        );
    }
}
